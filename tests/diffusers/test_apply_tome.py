import pytest
import torch

from tomesd_ext import apply_tome, remove_tome
from tomesd_ext.core import OptionError
from tomesd_ext.diffusers import tome_options
from tomesd_ext.diffusers.processors import MergedAttnProcessor

from conftest import run, unet_inputs


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _attn1(unet):
    return [m for n, m in unet.named_modules() if n.endswith("attn1")]


@pytest.mark.parametrize(
    "kwargs", [{}, {"merge_crossattn": True, "merge_mlp": True}, {"use_rand": False, "max_downsample": 8}]
)
def test_ratio_zero_and_remove_are_bit_identical(tiny_unet, kwargs):
    inputs = unet_inputs(tiny_unet)
    base = run(tiny_unet, inputs)
    apply_tome(tiny_unet, 0.0, **kwargs)
    assert torch.equal(run(tiny_unet, inputs), base)
    apply_tome(tiny_unet, 0.5, seed=0, **kwargs)
    assert not torch.equal(run(tiny_unet, inputs), base)
    remove_tome(tiny_unet)
    assert torch.equal(run(tiny_unet, inputs), base)
    assert not hasattr(tiny_unet, "_tomesd_ext_patch")
    assert not tiny_unet._forward_pre_hooks
    assert all(not isinstance(m.processor, MergedAttnProcessor) for m in _attn1(tiny_unet))


def test_merging_changes_output_moderately_and_every_operator_counts(tiny_unet):
    inputs = unet_inputs(tiny_unet)
    base = run(tiny_unet, inputs)
    errors = {}
    for name, kw in {
        "attn": {},
        "attn+cross": {"merge_crossattn": True},
        "attn+cross+mlp": {"merge_crossattn": True, "merge_mlp": True},
        "mlp": {"merge_attn": False, "merge_mlp": True},
    }.items():
        apply_tome(tiny_unet, 0.5, seed=1, **kw)
        out = run(tiny_unet, inputs)
        assert torch.isfinite(out).all()
        errors[name] = _rel(out, base)
    remove_tome(tiny_unet)
    assert 0 < errors["attn"] < errors["attn+cross"] < errors["attn+cross+mlp"] < 1
    assert errors["mlp"] > 0


def test_same_seed_same_result_on_every_call_and_reapply(tiny_unet):
    inputs = unet_inputs(tiny_unet)
    apply_tome(tiny_unet, 0.5, seed=3)
    a, b = run(tiny_unet, inputs), run(tiny_unet, inputs)
    apply_tome(tiny_unet, 0.5, seed=3)
    c = run(tiny_unet, inputs)
    apply_tome(tiny_unet, 0.5, seed=4)
    d = run(tiny_unet, inputs)
    remove_tome(tiny_unet)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)


def test_apply_again_replaces_instead_of_stacking(tiny_unet):
    apply_tome(tiny_unet, 0.3, seed=0)
    apply_tome(tiny_unet, 0.6, seed=0, merge_mlp=True)
    try:
        assert tome_options(tiny_unet).ratio == 0.6
        assert len(tiny_unet._forward_pre_hooks) == 1
        for attn in _attn1(tiny_unet):
            assert isinstance(attn.processor, MergedAttnProcessor)
            assert not isinstance(attn.processor.inner, MergedAttnProcessor)
    finally:
        remove_tome(tiny_unet)
    assert tome_options(tiny_unet) is None


def test_cond_and_uncond_share_one_partition_even_in_separate_calls(tiny_unet):
    sample, t, text, kw = unet_inputs(tiny_unet, batch=2)
    apply_tome(tiny_unet, 0.5, seed=0)
    try:
        both = run(tiny_unet, (sample, t, text, kw))
        first = run(tiny_unet, (sample[:1], t, text[:1], kw))
        second = run(tiny_unet, (sample[1:], t, text[1:], kw))
    finally:
        remove_tome(tiny_unet)
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_partition_changes_with_timestep(tiny_unet):
    sample, _, text, kw = unet_inputs(tiny_unet)
    base = [run(tiny_unet, (sample, torch.tensor(t), text, kw)) for t in (500, 499)]
    apply_tome(tiny_unet, 0.5, seed=0)
    merged = [run(tiny_unet, (sample, torch.tensor(t), text, kw)) for t in (500, 499)]
    remove_tome(tiny_unet)
    # neighbouring timesteps give nearly the same unmerged output but different partitions
    assert abs(_rel(merged[0], base[0]) - _rel(merged[1], base[1])) > 1e-4


def test_odd_and_non_square_latents(tiny_unet):
    inputs = unet_inputs(tiny_unet, batch=1, hw=(9, 13))
    base = run(tiny_unet, inputs)
    apply_tome(tiny_unet, 0.5, seed=0)
    out = run(tiny_unet, inputs)
    remove_tome(tiny_unet)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert 0 < _rel(out, base) < 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_unet(dtype):
    from tomesd_ext.models import build_unet

    unet = build_unet("tiny", seed=0, dtype=dtype).eval()
    sample, t, text, kw = unet_inputs(unet)
    inputs = (sample.to(dtype), t, text.to(dtype), kw)
    base = run(unet, inputs)
    apply_tome(unet, 0.5, seed=0)
    out = run(unet, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    apply_tome(unet, 0.0)
    assert torch.equal(run(unet, inputs), base)


def test_sdxl_merges_with_auto_and_not_at_full_resolution(tiny_sdxl_unet):
    unet = tiny_sdxl_unet
    inputs = unet_inputs(unet)
    base = run(unet, inputs)
    apply_tome(unet, 0.5, seed=0, max_downsample=1)
    assert torch.equal(run(unet, inputs), base)  # SDXL has no attention at d=1
    apply_tome(unet, 0.5, seed=0)
    assert unet._tomesd_ext_patch.runtime.max_downsample == 2
    out = run(unet, inputs)
    remove_tome(unet)
    assert not torch.equal(out, base) and _rel(out, base) < 1


def test_max_downsample_selects_levels(tiny_unet):
    inputs = unet_inputs(tiny_unet)
    base = run(tiny_unet, inputs)
    errs = []
    for md in (1, 2):
        apply_tome(tiny_unet, 0.5, seed=0, max_downsample=md)
        errs.append(_rel(run(tiny_unet, inputs), base))
    remove_tome(tiny_unet)
    assert 0 < errs[0] < errs[1]


@pytest.mark.parametrize(
    "kwargs,message",
    [({"ratio": 1.5}, "ratio=1.5"), ({"sx": 0}, "sx=0"), ({"max_downsample": 3}, "max_downsample=3")],
)
def test_bad_options_raise_before_patching(tiny_unet, kwargs, message):
    with pytest.raises(OptionError, match=message):
        apply_tome(tiny_unet, **kwargs)
    assert not hasattr(tiny_unet, "_tomesd_ext_patch")


def test_unsupported_models_raise_naming_the_class():
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    from tomesd_ext.diffusers import apply_query_merge

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8)
    with pytest.raises(TypeError, match="DiTTransformer2DModel.*supported are UNet2DConditionModel.*PixArtTransformer2DModel"):
        apply_tome(dit)
    pixart = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8,
        cross_attention_dim=16, caption_channels=8, norm_num_groups=1,
    )
    with pytest.raises(TypeError, match="PixArtTransformer2DModel.*no transformer support"):
        apply_query_merge(pixart)
    with pytest.raises(TypeError, match="cannot patch dict"):
        apply_tome({})


def test_custom_processor_kwargs_and_module_processors_survive(tiny_unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    seen = []

    class ScaledProcessor(torch.nn.Module):
        """A stand-in for IP-Adapter: an nn.Module processor with weights and an extra kwarg."""

        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(1))
            self.inner = AttnProcessor2_0()

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, my_scale=1.0):
            seen.append((my_scale, hidden_states.shape[1]))
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask) * self.gain

    attn = _attn1(tiny_unet)[0]
    original = attn.processor
    attn.set_processor(ScaledProcessor())
    keys = set(tiny_unet.state_dict())
    sample, t, text, kw = unet_inputs(tiny_unet)
    try:
        apply_tome(tiny_unet, 0.5, seed=0)
        assert set(tiny_unet.state_dict()) == keys
        with torch.no_grad():
            tiny_unet(sample, t, encoder_hidden_states=text, cross_attention_kwargs={"my_scale": 2.0})
        n = sample.shape[-1] * sample.shape[-2]
        assert seen and seen[0][0] == 2.0 and seen[0][1] < n  # kwarg reached it, tokens merged
        remove_tome(tiny_unet)
        assert isinstance(attn.processor, ScaledProcessor) and set(tiny_unet.state_dict()) == keys
    finally:
        attn.set_processor(original)


def test_remove_keeps_a_processor_the_user_set_meanwhile(tiny_unet):
    from diffusers.models.attention_processor import AttnProcessor

    before = tiny_unet.attn_processors
    apply_tome(tiny_unet, 0.5, seed=0)
    attn = _attn1(tiny_unet)[0]
    mine = AttnProcessor()
    attn.set_processor(mine)
    remove_tome(tiny_unet)
    assert attn.processor is mine
    tiny_unet.set_attn_processor(before)


def test_xformers_processor_is_kept_when_enabled(tiny_unet):
    pytest.importorskip("xformers", reason="xformers is not installed (optional; CUDA only)")
    if not torch.cuda.is_available():
        pytest.skip("xformers attention needs a CUDA device")
    from diffusers.models.attention_processor import XFormersAttnProcessor

    unet = tiny_unet.to("cuda")
    before = unet.attn_processors
    unet.enable_xformers_memory_efficient_attention()
    try:
        apply_tome(unet, 0.5, seed=0)
        for attn in _attn1(unet):
            assert isinstance(attn.processor.inner, XFormersAttnProcessor)
        sample, t, text, kw = unet_inputs(unet)
        run(unet, (sample.cuda(), t, text.cuda(), kw))
        remove_tome(unet)
        assert all(isinstance(a.processor, XFormersAttnProcessor) for a in _attn1(unet))
    finally:
        unet.set_attn_processor(before)
        unet.to("cpu")
