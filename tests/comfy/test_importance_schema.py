"""Pure-Python tests of the importance node and its ComfyUI-side state (no ComfyUI needed): the
schema, option validation, and the post-CFG map / batch-order / cfg = 1 logic on tensors."""

import logging

import pytest
import torch

import nodes
from comfy_env import node_defaults
from nodes.importance import TomesdExtImportanceMerging
from nodes.tome import TomesdExtTokenMerging
from comfy_env import runtime_plan
from tomesd_ext.comfy.importance import NO_CFG_WARNING, ImportanceMapHook, importance_state
from tomesd_ext.comfy.patching import DiffusionModelWrapper
from tomesd_ext.comfy.tome import Attn1Patch
from tomesd_ext.core import OptionError, ToMeOptions, derive_seed, importance_partitions, merge, pool_to_grid


def _widgets(**over):
    return node_defaults(TomesdExtImportanceMerging, **over)


def test_registered_with_display_name_and_category():
    assert nodes.NODE_DEFINITIONS["TomesdExtImportanceMerging"] is TomesdExtImportanceMerging
    assert nodes.DISPLAY_NAMES["TomesdExtImportanceMerging"] == "Token Merging (Importance, tomesd-ext)"
    assert TomesdExtImportanceMerging.CATEGORY == "model_patches/token_merging"
    assert TomesdExtImportanceMerging.FUNCTION == "patch" and TomesdExtImportanceMerging.RETURN_TYPES == ("MODEL",)


def test_schema_inputs_tooltips_defaults_limits():
    required = TomesdExtImportanceMerging.INPUT_TYPES()["required"]
    assert list(required) == [
        "model", "ratio", "max_downsample", "sx", "sy", "seed", "pool_factor", "prune_steps",
        "merge_attn", "merge_crossattn", "merge_mlp", "min_tokens", "start_percent", "end_percent",
    ]
    for name, (kind, spec) in required.items():
        assert spec.get("tooltip"), name
        if kind in ("INT", "FLOAT"):
            assert spec["min"] <= spec["default"] <= spec["max"], name
    assert (required["pool_factor"][1]["min"], required["pool_factor"][1]["default"], required["pool_factor"][1]["max"]) == (0.5, 1.4, 4.0)
    assert required["prune_steps"][1]["default"] == 0
    assert "pool_factor" in required["ratio"][1]["tooltip"]
    # the shared inputs keep the ToMe node's spec (one source for both nodes)
    tome = TomesdExtTokenMerging.INPUT_TYPES()["required"]
    for name in ("max_downsample", "sx", "sy", "merge_attn", "min_tokens", "start_percent", "end_percent"):
        assert required[name] == tome[name]
    assert "use_rand" not in required


def test_options_from_widgets_and_errors():
    w = _widgets(seed=7, pool_factor=1.0, prune_steps=2)
    opts = TomesdExtImportanceMerging.options(**{k: w[k] for k in w if not k.endswith("percent")})
    assert opts == ToMeOptions.create(ratio=0.5, seed=7, min_tokens=2048, mode="importance", pool_factor=1.0, prune_steps=2)
    with pytest.warns(UserWarning, match="importance pool"):
        clamped = TomesdExtImportanceMerging.options(**{k: w[k] for k in w if not k.endswith("percent")} | {"ratio": 0.7, "pool_factor": 0.5})
    assert clamped.ratio == 0.5
    bad = {k: w[k] for k in w if not k.endswith("percent")} | {"pool_factor": 5.0}
    with pytest.raises(OptionError, match="pool_factor"):
        TomesdExtImportanceMerging.options(**bad)
    assert "must not exceed" in TomesdExtImportanceMerging.VALIDATE_INPUTS(start_percent=0.9, end_percent=0.1)
    assert "out of range" in TomesdExtImportanceMerging.VALIDATE_INPUTS(sx=65)


def test_validate_inputs_leaves_comfyui_range_checks_on():
    """ComfyUI skips its min/max check for inputs that VALIDATE_INPUTS receives (all of them when
    it takes **kwargs): ours names only those it checks itself."""
    import inspect

    checked = {"start_percent", "end_percent", "sx", "sy"}
    for cls, extra in ((TomesdExtTokenMerging, {"st", "frame_reach"}), (TomesdExtImportanceMerging, set())):
        spec = inspect.getfullargspec(cls.VALIDATE_INPUTS)
        assert spec.varkw is None and set(spec.args) - {"cls"} == checked | extra


def _state(**kw):
    opts = ToMeOptions.create(**{"ratio": 0.5, "seed": 3, "min_tokens": 0, "mode": "importance", **kw})
    return opts, importance_state(opts, max_downsample=1)


def _call(state, x, t, order):
    """Begin a UNet call the way the DIFFUSION_MODEL wrapper does (x: (B, C, H, W))."""
    state.begin_call(x, torch.tensor([float(t)] * x.shape[0]), None, {"cond_or_uncond": order})


def _hook_args(cond, uncond, sigma, cond_scale=7.0, has_uncond=True):
    return {"denoised": cond, "cond_denoised": cond, "uncond_denoised": uncond, "sigma": sigma,
            "cond_scale": cond_scale, "uncond": [{}] if has_uncond else None, "cond": [{}], "input": cond}


def test_post_cfg_map_is_x0_difference_over_sigma():
    _opts, state = _state()
    g = torch.Generator().manual_seed(0)
    x, eps_c, eps_u = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([3.0, 3.0])
    hook = ImportanceMapHook(state)
    _call(state, torch.cat([x, x]), 700, [1, 0])
    cond = x - 3.0 * eps_c
    assert hook(_hook_args(cond, x - 3.0 * eps_u, sigma)) is cond  # denoised passes through
    torch.testing.assert_close(state.policy.hmap, (eps_c - eps_u).abs().mean(1), rtol=1e-5, atol=1e-5)


def test_map_drives_the_next_step_with_rows_of_each_image_in_any_chunk_order():
    opts, state = _state()
    g = torch.Generator().manual_seed(1)
    hmap = torch.rand(2, 8, 8, generator=g)
    _call(state, torch.zeros(4, 4, 8, 8), 700, [1, 0])
    state.policy.set_map(hmap)
    n = torch.randn(4, 64, 16, generator=g)
    plans = {}
    for order in ([1, 0], [0, 1]):
        _call(state, torch.zeros(4, 4, 8, 8), 500, order)
        assert state.policy.active is hmap
        plans[tuple(order)] = state.runtime.plan_for(n)
    # image i = rows i and 2 + i whatever the order; both rows share image i's destinations
    parts = importance_partitions(pool_to_grid(hmap, 8, 8), 8, 8, 0.5, 2, 2, 1.4, derive_seed(3, "importance", state.runtime.step_key, 8, 8))
    for plan in plans.values():
        for i in range(2):
            for row in (i, 2 + i):
                assert torch.equal(plan.group[row, parts[i].dst], torch.arange(parts[i].dst.numel()))
    assert torch.equal(plans[(1, 0)].group, plans[(0, 1)].group)
    # separate calls (one chunk each) use the same map and the same rows per image
    _call(state, torch.zeros(2, 4, 8, 8), 500, [0])
    single = state.runtime.plan_for(n[:2])
    assert torch.equal(single.group, plans[(1, 0)].group[:2])
    assert state.policy.counts == {"importance": 3, "tome": 0}


def test_map_of_another_run_or_size_is_not_used():
    _opts, state = _state()
    _call(state, torch.zeros(2, 4, 8, 8), 500, [1, 0])
    state.policy.set_map(torch.rand(1, 8, 8))
    _call(state, torch.zeros(2, 4, 8, 8), 900, [1, 0])  # timestep went up: a new run
    assert state.policy.active is None
    state.policy.set_map(torch.rand(1, 8, 8))
    _call(state, torch.zeros(2, 4, 16, 16), 800, [1, 0])  # other latent size
    assert state.policy.active is None
    _call(state, torch.zeros(3, 4, 8, 8), 700, [1, 0])  # batch not made of the chunks
    assert state.policy.active is None


def test_cfg1_drops_the_map_and_warns_once(caplog):
    opts, state = _state()
    hook = ImportanceMapHook(state)
    x = torch.randn(1, 4, 8, 8)
    with caplog.at_level(logging.WARNING, logger="tomesd_ext"):
        for _ in range(3):
            _call(state, x, 500, [0])
            hook(_hook_args(x, torch.zeros_like(x), torch.tensor([2.0]), cond_scale=1.0, has_uncond=False))
            assert state.policy.hmap is None
    assert [r.getMessage() for r in caplog.records if r.name == "tomesd_ext"] == [NO_CFG_WARNING]
    # without a map the planner is ToMe's: the same plan as the ToMe node's state
    _call(state, x, 400, [0])
    n = torch.randn(1, 64, 8)
    ours = Attn1Patch(state)(n, n, n, {})[0]
    tome_opts = ToMeOptions.create(ratio=0.5, seed=3, min_tokens=0)
    assert torch.equal(ours, merge(n, runtime_plan(n, (8, 8), state.runtime.step_key, tome_opts, 1)))


def test_wrapper_passes_cond_or_uncond_to_the_state():
    _opts, state = _state()
    state.policy.set_map(torch.rand(1, 8, 8))
    state.policy.hmap_step = 1000.0
    seen = {}

    def executor(x, timesteps, *args, **kwargs):
        seen["rows"] = [r.tolist() for r in state.policy.rows]
        return x

    DiffusionModelWrapper(state)(executor, torch.zeros(3, 4, 8, 8), torch.tensor([500.0] * 3), None, None, None,
                                 {"cond_or_uncond": [1, 0, 0], "sigmas": torch.tensor([5.0])})
    assert seen["rows"] == [[0, 1, 2]]  # one image, three chunks (e.g. two cond entries batched)
