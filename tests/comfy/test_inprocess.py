"""The ComfyUI adapter inside ComfyUI's own UNet (COMFYUI_PATH), on tiny models: exactness,
SDXL levels, replacement instead of stacking, pass-through, feed-forward object patches and
parity with the diffusers adapter on the same weights."""

import logging

import pytest
import torch

from comfy_env import comfy_model_from_diffusers, fake_dit_model, import_comfy, node_defaults, run_unet, tome_node

pytestmark = pytest.mark.comfyui

TINY_HEADS = {"num_heads": 2, "num_head_channels": -1}
TINY_XL_HEADS = {"num_heads": -1, "num_head_channels": 16}


@pytest.fixture(scope="module")
def comfy():
    import_comfy()


def _tiny_unet(name):
    """Our tiny config with 32 norm groups: ComfyUI's UNet hard-codes GroupNorm(32, C)."""
    from diffusers import UNet2DConditionModel

    from tomesd_ext.models import build_seeded, get_config

    config = {**get_config(name)["unet"], "norm_num_groups": 32}
    return build_seeded(lambda: UNet2DConditionModel(**config), seed=0)


@pytest.fixture(scope="module")
def tiny(comfy):
    unet = _tiny_unet("tiny")
    return unet, comfy_model_from_diffusers(unet, "sd", TINY_HEADS)


@pytest.fixture(scope="module")
def tiny_xl(comfy):
    unet = _tiny_unet("tiny-sdxl")
    return unet, comfy_model_from_diffusers(unet, "sdxl", TINY_XL_HEADS)




def _inputs(hw=16, ctx=32, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, hw, hw, generator=g), torch.randn(batch, 77, ctx, generator=g)


def _ours(patcher):
    patches = patcher.model_options.get("transformer_options", {}).get("patches", {})
    return {k: len(v) for k, v in patches.items()}


def test_simple_node_merges_as_the_advanced_node_at_its_defaults(tiny):
    """The simple ToMe node (ratio and the sampling window) runs the advanced node at its
    defaults, auto-skip included: at 48x48 (2304 tokens >= 2048) both give the same merged UNet
    output; at ratio 0 the simple node is bit-identical to the model."""
    from nodes.tome import TomesdExtTokenMerging, TomesdExtTokenMergingSimple

    _, base = tiny
    x, ctx = _inputs(hw=48)
    ref = run_unet(base, x, 500, ctx)
    simple = TomesdExtTokenMergingSimple().patch(base, ratio=0.6, start_percent=0.0, end_percent=1.0)[0]
    advanced = TomesdExtTokenMerging().patch(base, **node_defaults(TomesdExtTokenMerging, ratio=0.6))[0]
    out = run_unet(simple, x, 500, ctx)
    assert torch.equal(out, run_unet(advanced, x, 500, ctx))
    assert not torch.allclose(out, ref, atol=1e-4)
    assert torch.equal(run_unet(TomesdExtTokenMergingSimple().patch(base, ratio=0.0)[0], x, 500, ctx), ref)
    assert torch.equal(run_unet(base, x, 500, ctx), ref)  # the input model untouched


def test_discovery_auto_levels(tiny, tiny_xl):
    from tomesd_ext.comfy.discovery import attention_levels, unet_of

    assert attention_levels(unet_of(tiny[1])) == [1, 2, 4]  # the middle block has attention too
    assert attention_levels(unet_of(tiny_xl[1])) == [2, 4]


def test_ratio_zero_and_input_model_untouched_exact(tiny):
    _unet, base = tiny
    x, ctx = _inputs()
    ref = run_unet(base, x, 500, ctx)
    patched = tome_node(base, ratio=0.0, merge_mlp=True, merge_crossattn=True)
    assert patched is not base
    assert torch.equal(run_unet(patched, x, 500, ctx), ref)
    merged = run_unet(tome_node(base, ratio=0.5, merge_mlp=True), x, 500, ctx)
    assert not torch.allclose(merged, ref, atol=1e-4)
    assert torch.equal(run_unet(base, x, 500, ctx), ref)  # object patches undone, input clean


def test_comfy_matches_diffusers_adapter_on_same_weights(tiny):
    """The same merge in both implementations: outputs agree to float noise and so do the
    merged-minus-unmerged deltas (the part that token merging changes)."""
    from tomesd_ext import apply_tome, remove_tome

    unet, base = tiny
    x, ctx = _inputs(hw=16, batch=2)
    for kw in ({}, {"merge_crossattn": True, "merge_mlp": True}, {"max_downsample": "2", "use_rand": False}):
        comfy_ref = run_unet(base, x, 500, ctx)
        comfy_out = run_unet(tome_node(base, ratio=0.5, seed=5, **kw), x, 500, ctx)
        with torch.no_grad():
            diff_ref = unet(x, 500, encoder_hidden_states=ctx).sample
            md = kw.get("max_downsample", "auto")
            apply_tome(unet, 0.5, seed=5, min_tokens=0, max_downsample=md if md == "auto" else int(md),
                       use_rand=kw.get("use_rand", True), merge_crossattn=kw.get("merge_crossattn", False),
                       merge_mlp=kw.get("merge_mlp", False))
            diff_out = unet(x, 500, encoder_hidden_states=ctx).sample
            remove_tome(unet)
        torch.testing.assert_close(comfy_ref, diff_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(comfy_out, diff_out, rtol=1e-4, atol=1e-4)
        delta_c, delta_d = comfy_out - comfy_ref, diff_out - diff_ref
        assert delta_d.norm() > 1e-3
        assert (delta_c - delta_d).norm() / delta_d.norm() < 1e-3, kw


def test_sdxl_topology_merges_with_auto(tiny_xl):
    _unet, base = tiny_xl
    x, ctx = _inputs(hw=16, ctx=64)
    y = torch.randn(2, 80, generator=torch.Generator().manual_seed(2))
    ref = run_unet(base, x, 300, ctx, y=y)
    out = run_unet(tome_node(base, ratio=0.5), x, 300, ctx, y=y)
    assert not torch.allclose(out, ref, atol=1e-4)
    assert torch.equal(run_unet(tome_node(base, ratio=0.5, max_downsample="1"), x, 300, ctx, y=y), ref)


def test_second_node_replaces_first(tiny):
    _unet, base = tiny
    x, ctx = _inputs()
    once = tome_node(base, ratio=0.5, seed=3)
    twice = tome_node(tome_node(base, ratio=0.3, seed=9, merge_crossattn=True, merge_mlp=True), ratio=0.5, seed=3)
    assert _ours(twice) == _ours(once) == {"attn1_patch": 1, "attn1_output_patch": 1}
    assert not twice.object_patches
    assert torch.equal(run_unet(twice, x, 500, ctx), run_unet(once, x, 500, ctx))


def test_start_end_percent_window(tiny):
    _unet, base = tiny
    x, ctx = _inputs()
    sampling = base.get_model_object("model_sampling")
    ref = run_unet(base, x, 500, ctx, sigma=14.0)
    late = tome_node(base, ratio=0.5, start_percent=0.5, end_percent=1.0)
    sigma_mid = float(sampling.percent_to_sigma(0.5))
    assert torch.equal(run_unet(late, x, 500, ctx, sigma=sigma_mid * 2), ref)  # before start
    assert not torch.allclose(run_unet(late, x, 500, ctx, sigma=sigma_mid / 2), ref, atol=1e-4)


def test_unsupported_model_passes_through_with_one_warning(comfy, caplog):
    model = fake_dit_model()
    with caplog.at_level(logging.WARNING, logger="tomesd_ext"):
        assert tome_node(model, ratio=0.5) is model
    warnings = [r for r in caplog.records if r.name == "tomesd_ext"]
    assert len(warnings) == 1 and "FakeDiT" in warnings[0].getMessage()


def test_block_mode_exact_at_zero_matches_diffusers_and_replaces(tiny):
    """unet_mode="block": every BasicTransformerBlock is stood in for (an object patch, undone on
    unload); ratio 0 is exact, the merged output matches the diffusers adapter's block mode on the
    same weights, and an ops-mode node on top replaces it."""
    from tomesd_ext import apply_tome, remove_tome
    from tomesd_ext.comfy.tome import MergedBlock

    unet, base = tiny
    x, ctx = _inputs(hw=16, batch=2)
    ref = run_unet(base, x, 500, ctx)
    assert torch.equal(run_unet(tome_node(base, ratio=0.0, unet_mode="block"), x, 500, ctx), ref)
    patched = tome_node(base, ratio=0.5, seed=5, unet_mode="block", max_downsample="2")
    assert patched.object_patches and all(isinstance(p, MergedBlock) for p in patched.object_patches.values())
    assert _ours(patched) == {}
    comfy_out = run_unet(patched, x, 500, ctx)
    assert torch.equal(run_unet(base, x, 500, ctx), ref)  # object patches undone, input clean
    with torch.no_grad():
        diff_ref = unet(x, 500, encoder_hidden_states=ctx).sample
        apply_tome(unet, 0.5, seed=5, min_tokens=0, max_downsample=2, unet_mode="block")
        try:
            diff_out = unet(x, 500, encoder_hidden_states=ctx).sample
        finally:
            remove_tome(unet)
    torch.testing.assert_close(comfy_out, diff_out, rtol=1e-4, atol=1e-4)
    delta_c, delta_d = comfy_out - ref, diff_out - diff_ref
    assert delta_d.norm() > 1e-3
    assert (delta_c - delta_d).norm() / delta_d.norm() < 1e-3
    ops = tome_node(patched, ratio=0.5, seed=5, unet_mode="ops")
    assert not ops.object_patches and _ours(ops) == {"attn1_patch": 1, "attn1_output_patch": 1}
