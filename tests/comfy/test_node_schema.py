"""Pure-Python tests of the node front end and the patch functions (no ComfyUI needed)."""

import copy
import os

import pytest
import torch

import nodes
from nodes.tome import TomesdExtTokenMerging, TomesdExtTokenMergingSimple
from comfy_env import API_COPIES, EXAMPLES, FRONTEND_ONLY, load_workflow, patch_state, runtime_plan
from tomesd_ext.comfy.patching import DiffusionModelWrapper
from tomesd_ext.comfy.tome import Attn1OutputPatch, Attn1Patch, Attn2OutputPatch, Attn2Patch, MergedFeedForward
from tomesd_ext.core import OptionError, ToMeOptions, merge, timestep_key, unmerge

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mappings_and_prefixed_ids():
    assert set(nodes.NODE_DEFINITIONS) == set(nodes.DISPLAY_NAMES)
    for node_id, cls in nodes.NODE_DEFINITIONS.items():
        assert node_id.startswith("TomesdExt")
        assert cls.CATEGORY == "model_patches/token_merging"
        assert cls.RETURN_TYPES == ("MODEL",) and callable(getattr(cls, cls.FUNCTION))


def test_schema_inputs_have_tooltips_defaults_and_limits():
    required = TomesdExtTokenMerging.INPUT_TYPES()["required"]
    assert list(required) == [
        "model", "ratio", "max_downsample", "sx", "sy", "use_rand", "seed",
        "merge_attn", "merge_crossattn", "merge_mlp", "min_tokens", "start_percent", "end_percent",
        "dit_mode", "skip_ends",  # added after the window: saved workflows keep their widget order
        "st", "keep_first_frame",  # video transformers, added after the transformer inputs
        "frame_reach",  # added after them
        "max_error",  # ratio="auto" (0 = off), added last
        "unet_mode",  # UNets, added last
    ]
    for name, (kind, spec) in required.items():
        assert spec.get("tooltip"), name
        if kind in ("INT", "FLOAT"):
            assert spec["min"] <= spec["default"] <= spec["max"], name
    assert required["max_downsample"][0] == ["auto", "1", "2", "4", "8", "16", "32", "64"]  # core.TOME_OPTIONS
    assert required["ratio"][1]["max"] < 1.0


def test_simple_node_shows_ratio_and_the_window_and_runs_the_advanced_defaults():
    """"Token Merging (ToMe)" beside "Token Merging (ToMe, Advanced)" (KSampler beside
    KSamplerAdvanced): the options the core table marks simple (ratio) and the sampling window,
    with the advanced node's specs; every other input at the advanced node's default."""
    from tomesd_ext.core import TOME_OPTIONS

    simple = TomesdExtTokenMergingSimple.INPUT_TYPES()["required"]
    full = TomesdExtTokenMerging.INPUT_TYPES()["required"]
    assert [name for name, o in TOME_OPTIONS.items() if o.simple] == ["ratio"]
    assert list(simple) == ["model", "ratio", "start_percent", "end_percent"]
    assert all(simple[name] == full[name] for name in simple)
    hidden = TomesdExtTokenMergingSimple.hidden_defaults()
    assert list(hidden) == [name for name in full if name not in simple]
    assert hidden == {name: full[name][1]["default"] for name in hidden}
    assert hidden["seed"] == 0 and hidden["min_tokens"] == 2048  # fixed seed, the measured auto-skip
    assert TomesdExtTokenMergingSimple.options(ratio=0.3) == TomesdExtTokenMerging.options(**dict(hidden, ratio=0.3))
    assert TomesdExtTokenMergingSimple.options(ratio=0.3) == ToMeOptions.create(ratio=0.3, seed=0)
    with pytest.raises(OptionError, match="ratio"):
        TomesdExtTokenMergingSimple.options(ratio=1.5)
    assert TomesdExtTokenMergingSimple.VALIDATE_INPUTS(start_percent=0.2, end_percent=0.8) is True
    assert "must not exceed" in TomesdExtTokenMergingSimple.VALIDATE_INPUTS(start_percent=0.9, end_percent=0.1)
    assert "end_percent=1.5 is out of range" in TomesdExtTokenMergingSimple.VALIDATE_INPUTS(end_percent=1.5)
    assert nodes.DISPLAY_NAMES["TomesdExtTokenMergingSimple"] == "Token Merging (ToMe)"
    assert nodes.DISPLAY_NAMES["TomesdExtTokenMerging"] == "Token Merging (ToMe, Advanced)"
    assert list(nodes.NODE_DEFINITIONS)[:2] == ["TomesdExtTokenMergingSimple", "TomesdExtTokenMerging"]


def test_shipped_tome_workflows_use_the_simple_node():
    """Every shipped ToMe workflow sets nothing beyond ratio and the window, so it uses the simple node."""
    for name in sorted(os.listdir(API_COPIES)):
        prompt = load_workflow(name)
        assert "TomesdExtTokenMerging" not in {v["class_type"] for v in prompt.values()}, name


def _widgets(**over):
    spec = TomesdExtTokenMerging.INPUT_TYPES()["required"]
    values = {k: v[1]["default"] for k, v in spec.items() if k != "model"}
    values.update(over)
    return values


def test_options_from_widgets_and_errors():
    w = _widgets(max_downsample="2", seed=7)
    opts = TomesdExtTokenMerging.options(**{k: w[k] for k in w if not k.endswith("percent")})
    assert opts == ToMeOptions.create(ratio=0.5, max_downsample=2, seed=7, min_tokens=2048)
    bad = {k: w[k] for k in w if not k.endswith("percent")}
    bad.update(merge_attn=False, merge_crossattn=False, merge_mlp=False)
    with pytest.raises(OptionError, match="nothing to merge"):
        TomesdExtTokenMerging.options(**bad)
    with pytest.warns(UserWarning, match="maximum 0.75"):
        clamped = TomesdExtTokenMerging.options(**dict(bad, merge_attn=True, ratio=0.9))
    assert clamped.ratio == 0.75


def test_validate_inputs():
    assert TomesdExtTokenMerging.VALIDATE_INPUTS(start_percent=0.2, end_percent=0.8) is True
    assert "must not exceed" in TomesdExtTokenMerging.VALIDATE_INPUTS(start_percent=0.9, end_percent=0.1)
    assert "sx*sy" in TomesdExtTokenMerging.VALIDATE_INPUTS(sx=1, sy=1)
    assert TomesdExtTokenMerging.VALIDATE_INPUTS(st=1, frame_reach=0) is True
    assert "frame_reach=0 is out of range" in TomesdExtTokenMerging.VALIDATE_INPUTS(st=2, frame_reach=0)
    assert "frame_reach=65" in TomesdExtTokenMerging.VALIDATE_INPUTS(frame_reach=65)
    assert "st=0" in TomesdExtTokenMerging.VALIDATE_INPUTS(st=0)


def _state(ratio=0.5, **kw):
    opts = ToMeOptions.create(ratio=ratio, seed=3, min_tokens=0, **kw)
    state = patch_state(opts, max_downsample=1)
    return opts, state


def _call(state, x_latent, t=500.0):
    """Emulate the diffusion-model wrapper's begin of a call."""
    wrapper = DiffusionModelWrapper(state)
    seen = {}

    def executor(x, timesteps, *args, **kwargs):
        seen["active"] = state.runtime.active
        return "out"

    assert wrapper(executor, x_latent, torch.tensor([t]), None, None, None, {"sigmas": torch.tensor([5.0])}) == "out"
    assert state.runtime.active is False  # end of the call resets
    return seen["active"]


def test_attn1_merges_q_k_v_and_output_unmerges():
    opts, state = _state(0.5)
    assert _call(state, torch.zeros(2, 4, 8, 8))
    state.begin_call(torch.zeros(2, 4, 8, 8), torch.tensor([500.0]), None)
    n = torch.randn(2, 64, 16)
    q, k, v = Attn1Patch(state)(n, n, n, {})
    expected = runtime_plan(n, (8, 8), timestep_key(500.0), opts, 1)
    assert q.shape == (2, 64 - 32, 16) and k is q and v is q
    torch.testing.assert_close(q, merge(n, expected), rtol=0, atol=0)
    out = Attn1OutputPatch(state)(q * 2, {})
    torch.testing.assert_close(out, unmerge(q * 2, expected), rtol=0, atol=0)
    assert out.shape == n.shape
    # the attn2 patches are inert when merge_crossattn is off
    n2 = torch.randn(2, 64, 16)
    ctx = torch.randn(2, 77, 16)
    assert Attn2Patch(state)(n2, ctx, ctx, {})[0] is n2
    assert Attn2OutputPatch(state)(n2, {}) is n2


def test_cross_attention_attn1_keeps_text_context_and_crossattn_merges_queries_only():
    _opts, state = _state(0.5, merge_crossattn=True)
    state.begin_call(torch.zeros(1, 4, 8, 8), 10.0, None)
    n = torch.randn(1, 64, 16)
    text = torch.randn(1, 77, 16)
    q, k, v = Attn1Patch(state)(n, text, text, {})
    assert q.shape[1] == 32 and k is text and v is text
    Attn1OutputPatch(state)(q, {})
    q2, k2, v2 = Attn2Patch(state)(torch.randn(1, 64, 16), text, text, {})
    assert q2.shape[1] == 32 and k2 is text and v2 is text
    assert Attn2OutputPatch(state)(q2, {}).shape[1] == 64


def test_inactive_outside_sigma_range_and_other_levels():
    opts = ToMeOptions.create(ratio=0.5, seed=1, min_tokens=0)
    state = patch_state(opts, 1, sigma_start=2.0, sigma_end=1.0)
    state.begin_call(torch.zeros(1, 4, 8, 8), 10.0, torch.tensor([5.0]))
    n = torch.randn(1, 64, 8)
    assert Attn1Patch(state)(n, n, n, {})[0] is n
    state.begin_call(torch.zeros(1, 4, 8, 8), 10.0, torch.tensor([1.5]))
    assert Attn1Patch(state)(n, n, n, {})[0].shape[1] == 32
    Attn1OutputPatch(state)(torch.randn(1, 32, 8), {})
    n16 = torch.randn(1, 16, 8)  # the d=2 level: above max_downsample=1
    assert Attn1Patch(state)(n16, n16, n16, {})[0] is n16


def test_min_tokens_skips_small_grids():
    opts = ToMeOptions.create(ratio=0.5, seed=1, min_tokens=100)
    state = patch_state(opts, 1)
    state.begin_call(torch.zeros(1, 4, 8, 8), 1.0, None)
    n = torch.randn(1, 64, 8)
    assert Attn1Patch(state)(n, n, n, {})[0] is n


def test_ratio_zero_is_identity_and_plan_shared_within_block():
    _opts, state = _state(0.0)
    state.begin_call(torch.zeros(1, 4, 8, 8), 1.0, None)
    n = torch.randn(1, 64, 8)
    assert Attn1Patch(state)(n, n, n, {})[0] is n
    assert Attn1OutputPatch(state)(n, {}) is n


def test_merged_feed_forward_keeps_parameter_names_and_merges():
    class FeedForward(torch.nn.Module):  # ComfyUI's FeedForward: forward(x) = net(x)
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

        def forward(self, x):
            return self.net(x)

    holder = FeedForward()
    _opts, state = _state(0.5, merge_mlp=True)
    wrapped = MergedFeedForward(holder, state)
    assert [k for k, _ in wrapped.named_parameters()] == [k for k, _ in holder.named_parameters()]
    assert all(a is b for a, b in zip(wrapped.parameters(), holder.parameters()))
    x = torch.randn(1, 64, 8)
    torch.testing.assert_close(wrapped(x), holder.net(x))  # no call in progress -> not merged
    state.begin_call(torch.zeros(1, 4, 8, 8), 1.0, None)
    plan = state.slot.get(x)
    torch.testing.assert_close(wrapped(x), unmerge(holder.net(merge(x, plan)), plan))


def test_deepcopy_keeps_shared_state():
    _opts, state = _state(0.5)
    patches = {"a": [Attn1Patch(state)], "b": [Attn1OutputPatch(state)]}
    copied = copy.deepcopy(patches)
    assert copied["a"][0] is patches["a"][0] and copied["a"][0].state is state


def test_shipped_workflows_are_ui_files_with_thumbnails_and_api_copies():
    """example_workflows/ (what ComfyUI's template browser lists) holds UI workflows only, each
    with a .jpg thumbnail of the same name and an API copy in tests/comfy/workflows/."""
    assert not os.path.exists(os.path.join(REPO, "workflows"))  # ComfyUI would list it as well
    shipped = sorted(os.listdir(EXAMPLES))
    ui = [f for f in shipped if f.endswith(".json")]
    assert ui, "no workflows shipped"
    assert sorted(ui + [f.replace(".json", ".jpg") for f in ui]) == shipped
    assert sorted(f.replace(".json", ".api.json") for f in ui) == sorted(os.listdir(API_COPIES))
    for f in ui:
        graph = load_workflow(f)
        assert "version" in graph and graph["nodes"], f  # the frontend refuses a file without a version
        prompt = load_workflow(f.replace(".json", ".api.json"))
        types = {n["class_type"] for n in prompt.values()}
        assert types & set(nodes.NODE_DEFINITIONS), f"{f} uses none of our nodes"
        assert {n["type"] for n in graph["nodes"] if n["type"] not in FRONTEND_ONLY} == types
        assert [n for n in graph["nodes"] if n["type"] == "Note"], f"{f} has no Note saying what it needs"
        with open(os.path.join(EXAMPLES, f.replace(".json", ".jpg")), "rb") as img:
            assert img.read(3) == b"\xff\xd8\xff", f"{f}: thumbnail is not a JPEG"


def test_comfy_runtime_honours_plan_reuse():
    """reuse="level": the level's second block reuses the first block's plan (ComfyUI path);
    reuse="block" (default): each block matches on its own input."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 64, 8, generator=g), torch.randn(1, 64, 8, generator=g)
    groups = {}
    for reuse in ("level", "block"):
        opts = ToMeOptions.create(ratio=0.5, seed=3, min_tokens=0, reuse=reuse)
        state = patch_state(opts, 1)
        state.begin_call(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), None)
        Attn1Patch(state)(a, a, a, {"block": ("input", 1), "block_index": 0})
        first = state.slot.plan
        Attn1Patch(state)(b, b, b, {"block": ("output", 5), "block_index": 0})
        groups[reuse] = (first.group, state.slot.plan.group)
        assert (state.runtime.cache is not None) == (reuse == "level")
    assert torch.equal(*groups["level"])
    assert not torch.equal(*groups["block"])


@pytest.mark.parametrize("node_name, inputs", [
    ("TomesdExtTokenMergingSimple", {"ratio": "abc"}), ("TomesdExtTokenMerging", {"ratio": "abc"}), ("TomesdExtTokenMerging", {"use_rand": "false"}),
    ("TomesdExtTokenMerging", {"sx": 2.5}), ("TomesdExtTokenMerging", {"max_downsample": "x"}),
    ("TomesdExtImportanceMerging", {"pool_factor": "big"}), ("TomesdExtVidToMe", {"align_batch": "false"}),
    ("TomesdExtVidToMe", {"chunk_size": "4"}),
])
def test_wrong_widget_types_are_option_errors_naming_the_input(node_name, inputs):
    """A value of the wrong type (a direct call, or an API prompt ComfyUI did not convert) is an
    OptionError naming the input, never a raw float()/int() error or a truthy string."""
    cls = nodes.NODE_DEFINITIONS[node_name]
    spec = cls.INPUT_TYPES()["required"]
    values = {k: v[1]["default"] for k, v in spec.items() if k not in ("model", "start_percent", "end_percent")}
    values.update(inputs)
    with pytest.raises(OptionError, match=next(iter(inputs))):
        cls.options(**values)


def test_window_with_a_wrong_type_is_a_clear_error():
    from tomesd_ext.comfy import window_error

    assert "start_percent must be a number" in window_error("abc", 1.0)
