"""apply_tome on diffusers' image transformers: exactness, image tokens only, layouts, LoRA, importance."""

import copy
import warnings

import pytest
import torch

from tomesd_ext import apply_tome, remove_tome

from .dit_models import FAMILIES, cfg_batch, make, make_video

MODES = ("block", "attn", "kv")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def run(m, kw, sample):
    with torch.no_grad():
        return sample(m(**kw))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_ratio_zero_and_removal_are_exact_and_merging_changes_the_output(family, mode):
    # an odd, non-square grid (13 x 9 tokens), batch 1
    m, kw, sample = make(family, batch=1, h=13, w=9)
    ref = run(m, kw, sample)
    apply_tome(m, 0.0, dit_mode=mode, seed=3, min_tokens=0)
    assert torch.equal(run(m, kw, sample), ref)
    apply_tome(m, 0.5, dit_mode=mode, seed=3, min_tokens=0)
    out = run(m, kw, sample)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert 0 < rel(out, ref) < 0.5
    remove_tome(m)
    assert torch.equal(run(m, kw, sample), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_odd_batch_and_cfg_batch(family):
    m, kw, sample = make(family, batch=3, h=8, w=12)
    apply_tome(m, 0.5, seed=1, min_tokens=0)
    out = run(m, kw, sample)
    assert out.shape[0] == 3 and torch.isfinite(out).all()
    m1, kw1, _ = make(family, batch=1, h=8, w=12)
    cfg = cfg_batch(kw1)
    apply_tome(m1, 0.5, seed=1, min_tokens=0)
    a, b = run(m1, cfg, sample).chunk(2)
    assert torch.equal(a, b)  # one plan for the batch: identical rows stay identical


def _shapes_seen(m, names):
    seen = []
    for name in names:
        for mod in m.modules():
            if type(mod).__name__ == name:
                mod.register_forward_pre_hook(
                    lambda mod, args, kwargs: seen.append(
                        (kwargs.get("hidden_states", args[0] if args else None).shape[1],
                         None if kwargs.get("encoder_hidden_states") is None else kwargs["encoder_hidden_states"].shape[1])
                    ),
                    with_kwargs=True,
                )
    return seen


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen-image"])
def test_block_mode_merges_image_tokens_only(family):
    h, w, txt = 12, 10, 7
    m, kw, sample = make(family, batch=2, h=h, w=w, txt=txt)
    apply_tome(m, 0.5, dit_mode="block", seed=0, min_tokens=0, sx=2, sy=2)
    seen = _shapes_seen(m, ["FluxAttention", "Attention", "JointAttention"] if family != "qwen-image" else ["Attention"])
    run(m, kw, sample)
    r = int(0.5 * h * w)
    joint = [s for s in seen if s[1] is not None]
    assert joint and all(s == (h * w - r, txt) for s in joint)  # text stream full length, image merged
    if family == "flux":  # single blocks see [text, image] concatenated: text + merged image
        assert (txt + h * w - r, None) in seen


def test_kv_mode_merges_keys_after_rope_and_keeps_queries():
    m, kw, sample = make("flux", batch=1, h=12, w=10, txt=7)
    apply_tome(m, 0.5, dit_mode="kv", seed=0, min_tokens=0)
    calls = []
    orig = torch.nn.functional.scaled_dot_product_attention
    from torch.overrides import TorchFunctionMode

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is orig:
                calls.append((kwargs.get("query", args[0] if args else None).shape[-2], kwargs.get("key", args[1] if len(args) > 1 else None).shape[-2]))
            return func(*args, **kwargs)

    with Spy():
        run(m, kw, sample)
    assert calls and all(q == 7 + 120 and k == 7 + 60 for q, k in calls)


def test_skip_ends_leaves_the_end_blocks_alone():
    m, kw, sample = make("flux", batch=1)  # 2 double + 2 single blocks
    ref = run(m, kw, sample)
    apply_tome(m, 0.5, seed=0, min_tokens=0, skip_ends=1)
    assert not torch.equal(run(m, kw, sample), ref)
    assert m._tomesd_ext_patch.runtime._slots == 2  # a slot per merged block: the middle two


def test_skip_ends_that_leaves_no_block_is_refused_at_apply_time():
    from tomesd_ext.core import OptionError

    m, kw, sample = make("flux", batch=1)  # 4 blocks: skip_ends 2 would merge none
    ref = run(m, kw, sample)
    for skip in (2, 10):
        with pytest.raises(OptionError, match=rf"skip_ends={skip} leaves no block to merge: this model has 4 blocks, .*\[0, 1\]"):
            apply_tome(m, 0.5, seed=0, min_tokens=0, skip_ends=skip)
        assert not hasattr(m, "_tomesd_ext_patch") and torch.equal(run(m, kw, sample), ref)  # nothing left attached
    v, vkw, vsample = make_video("wan", layers=3)
    with pytest.raises(OptionError, match="skip_ends=2 .* 3 blocks"):
        apply_tome(v, 0.5, seed=0, min_tokens=0, skip_ends=2)
    apply_tome(v, 0.5, seed=0, min_tokens=0, skip_ends=1)  # the middle block merges


def test_min_tokens_auto_skip_and_grid_that_cannot_be_read():
    m, kw, sample = make("pixart", batch=1, h=12, w=10)
    ref = run(m, kw, sample)
    apply_tome(m, 0.5, seed=0)  # default min_tokens 2048 > 120 tokens: not merged
    assert torch.equal(run(m, kw, sample), ref)
    m, kw, sample = make("flux", batch=1, h=12, w=10)
    ref = run(m, kw, sample)
    apply_tome(m, 0.5, seed=0, min_tokens=0)
    kw = dict(kw, img_ids=kw["img_ids"][torch.randperm(120, generator=torch.Generator().manual_seed(0))][:, [0, 2, 1]] * 0)
    with torch.no_grad():
        assert torch.isfinite(m(**kw).sample).all()  # ids give no grid: merges nothing, runs


def test_lora_after_patching_equals_lora_before():
    pytest.importorskip("peft")
    from peft import LoraConfig

    def lora(m):
        m.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))

    torch.manual_seed(5)
    a, kw, sample = make("flux", batch=1)
    b = copy.deepcopy(a)
    torch.manual_seed(9)
    lora(a)
    apply_tome(a, 0.5, seed=0, min_tokens=0)
    apply_tome(b, 0.5, seed=0, min_tokens=0)
    torch.manual_seed(9)
    lora(b)
    out_a, out_b = run(a, kw, sample), run(b, kw, sample)
    assert torch.equal(out_a, out_b)
    remove_tome(b)
    assert not torch.equal(run(b, kw, sample), out_b)


def test_deepcopy_of_a_patched_transformer_is_independent():
    m, kw, sample = make("sd3", batch=2)
    apply_tome(m, 0.5, seed=0, min_tokens=0)
    out = run(m, kw, sample)
    twin = copy.deepcopy(m)
    remove_tome(m)
    assert torch.equal(run(twin, kw, sample), out)


@pytest.mark.parametrize("family", ["sd3", "pixart", "z-image"])
def test_importance_mode_uses_the_batched_cfg_map(family):
    m, kw, sample = make(family, batch=1, h=12, w=10)
    cfg = cfg_batch(kw)
    apply_tome(m, 0.5, mode="importance", seed=0, min_tokens=0)
    policy = m._tomesd_ext_patch.policy
    run(m, cfg, sample)  # step 1: no map yet
    assert policy.counts["importance"] == 0
    later = dict(cfg)
    key = "t" if "t" in cfg else "timestep"
    later[key] = cfg[key] * 0.9
    out = run(m, later, sample)
    assert policy.counts["importance"] > 0 and torch.isfinite(out).all()


def test_importance_mode_pairs_separate_cond_and_uncond_calls():
    m, kw, sample = make("qwen-image", batch=1)
    apply_tome(m, 0.5, mode="importance", seed=0, min_tokens=0)
    policy = m._tomesd_ext_patch.policy
    uncond = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"] * 0)
    run(m, kw, sample)
    run(m, uncond, sample)  # same latent and timestep: the second call of a CFG pair
    later = dict(kw, timestep=kw["timestep"] * 0.9)
    run(m, later, sample)
    assert policy.counts["importance"] > 0


def test_importance_mode_without_cfg_warns_once_and_merges_with_windows():
    m, kw, sample = make("flux", batch=1)
    apply_tome(m, 0.5, mode="importance", seed=0, min_tokens=0)
    policy = m._tomesd_ext_patch.policy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (0.9, 0.8, 0.7):
            run(m, dict(kw, timestep=torch.tensor([step])), sample)
    said = [w for w in caught if "not a classifier-free-guidance pair" in str(w.message)]
    assert len(said) == 1
    assert policy.counts["importance"] == 0 and policy.counts["tome"] > 0


def test_pipeline_level_apply_finds_the_transformer():
    class Pipe:  # what apply_tome reads of a pipeline: its `transformer`
        pass

    pipe = Pipe()
    pipe.transformer, kw, sample = make("pixart", batch=1)
    ref = run(pipe.transformer, kw, sample)
    assert apply_tome(pipe, 0.5, seed=0, min_tokens=0) is pipe
    assert not torch.equal(run(pipe.transformer, kw, sample), ref)
    remove_tome(pipe)
    assert torch.equal(run(pipe.transformer, kw, sample), ref)


def test_z_image_batch_of_one_grid_merges_and_of_two_sizes_says_why_once(caplog):
    m, kw, sample = make("z-image", batch=2, h=12, w=10)
    g = torch.Generator().manual_seed(3)
    one_grid = dict(kw, cap_feats=[kw["cap_feats"][0], torch.randn(12, 24, generator=g)])  # captions differ
    two_sizes = dict(kw, x=[torch.randn(4, 1, 24, 20, generator=g), torch.randn(4, 1, 16, 20, generator=g)])
    with torch.no_grad():
        ref_one = m(**one_grid).sample
        ref_two = m(**two_sizes).sample
    apply_tome(m, 0.0, seed=0, min_tokens=0)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(m(**one_grid).sample, ref_one))
    apply_tome(m, 0.5, seed=0, min_tokens=0)
    with caplog.at_level("WARNING", logger="tomesd_ext"), torch.no_grad():
        merged = m(**one_grid).sample
        twice = [m(**two_sizes).sample for _ in range(2)]
    assert all(torch.isfinite(o).all() and 0 < rel(o, r) < 0.5 for o, r in zip(merged, ref_one))
    assert all(torch.equal(a, b) for out in twice for a, b in zip(out, ref_two))
    said = [r.getMessage() for r in caplog.records if "different sizes" in r.getMessage()]
    assert len(said) == 1 and "z-image" in said[0] and "not merged" in said[0]
    remove_tome(m)
