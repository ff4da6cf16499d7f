"""The VidToMe node inside ComfyUI's own UNet (COMFYUI_PATH), on the tiny SD1.x model: parity
with the diffusers adapter driven chunk by chunk as the video pipeline drives it, CFG batch
order and splitting, exactness with nothing merged, replacement, sampling window, pass-through."""

import logging

import pytest
import torch

from comfy_env import comfy_model_from_diffusers, fake_dit_model, import_comfy, node_defaults, run_unet

pytestmark = pytest.mark.comfyui

TINY_HEADS = {"num_heads": 2, "num_head_channels": -1}
FRAMES, T = 5, 500


@pytest.fixture(scope="module")
def tiny():
    import_comfy()
    from diffusers import UNet2DConditionModel

    from tomesd_ext.models import build_seeded, get_config

    config = {**get_config("tiny")["unet"], "norm_num_groups": 32}  # ComfyUI hard-codes GroupNorm(32, C)
    unet = build_seeded(lambda: UNet2DConditionModel(**config), seed=0).eval()
    return unet, comfy_model_from_diffusers(unet, "sd", TINY_HEADS)


def vidtome_node(model, **kw):
    from nodes.vidtome import TomesdExtVidToMe

    return TomesdExtVidToMe().patch(model, **node_defaults(TomesdExtVidToMe, **kw))[0]


def _video(frames=FRAMES, samples=2, hw=16, seed=1):
    """Sample-major CFG batch: the same latents in both halves, one text per half."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(frames, 4, hw, hw, generator=g)
    text = torch.randn(samples, 77, 32, generator=g).repeat_interleave(frames, 0)
    return torch.cat([lat] * samples), text


def _diffusers_chunked(unet, x, ctx, samples, **opts):
    """apply_vidtome driven like the video pipeline: one UNet call per chunk of the core's schedule."""
    from tomesd_ext import apply_vidtome, remove_vidtome
    from tomesd_ext.core import timestep_key
    from tomesd_ext.diffusers import vidtome_state

    apply_vidtome(unet, **opts)
    try:
        F = x.shape[0] // samples
        out = torch.empty_like(x)

        def call(frames):
            rows = torch.tensor([s * F + f for s in range(samples) for f in frames])
            with torch.no_grad():
                out[rows] = unet(x[rows], torch.tensor(T), encoder_hidden_states=ctx[rows]).sample

        vidtome_state(unet).run_step(F, samples, timestep_key(T), call)  # the core's chunks of this step
        return out
    finally:
        remove_vidtome(unet)


@pytest.mark.parametrize("kw", [
    {"chunk_size": 2, "seed": 3},
    {"chunk_size": 3, "local_ratio": 0.5, "global_ratio": 0.5, "max_downsample": "1", "seed": 4},
    {"chunk_size": 4, "align_batch": False, "global_rand": 1.0, "seed": 5},
])
def test_matches_diffusers_adapter_on_same_weights(tiny, kw):
    """Same merged output as apply_vidtome run per chunk (uncond first, as ComfyUI batches)."""
    unet, base = tiny
    x, ctx = _video()
    opts = {k: (int(v) if k == "max_downsample" else v) for k, v in kw.items()}
    with torch.no_grad():
        diff_ref = unet(x, torch.tensor(T), encoder_hidden_states=ctx).sample
    diff_out = _diffusers_chunked(unet, x, ctx, 2, **opts)
    comfy_ref = run_unet(base, x, T, ctx, cond_or_uncond=[1, 0])
    comfy_out = run_unet(vidtome_node(base, **kw), x, T, ctx, cond_or_uncond=[1, 0])
    torch.testing.assert_close(comfy_ref, diff_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comfy_out, diff_out, rtol=1e-4, atol=1e-4)
    delta_c, delta_d = comfy_out - comfy_ref, diff_out - diff_ref
    assert delta_d.norm() > 1e-2 * diff_ref.norm()
    assert (delta_c - delta_d).norm() / delta_d.norm() < 1e-3, kw


def _swap_halves(t, frames=FRAMES):
    return torch.cat([t[frames:], t[:frames]])


def test_cond_first_and_uncond_first_batches_agree(tiny):
    """cond_or_uncond [1, 0] vs [0, 1]: the halves swap places, the result does not change."""
    _unet, base = tiny
    x, ctx = _video()
    ctx = ctx.clone()
    ctx[FRAMES:] += 0.5  # make the halves differ beyond the text embedding draw
    node = vidtome_node(base, chunk_size=2, seed=7)
    a = run_unet(node, x, T, ctx, cond_or_uncond=[1, 0])
    b = run_unet(node, _swap_halves(x), T, _swap_halves(ctx), cond_or_uncond=[0, 1])
    torch.testing.assert_close(_swap_halves(b), a, rtol=0, atol=1e-6)


def _separate(node, x, ctx, first):
    """cond and uncond in two calls (ComfyUI's low-memory path), `first` half first."""
    halves = {1: (x[:FRAMES], ctx[:FRAMES]), 0: (x[FRAMES:], ctx[FRAMES:])}
    out = {}
    for which in (first, 1 - first):
        hx, hc = halves[which]
        out[which] = run_unet(node, hx, T, hc, cond_or_uncond=[which])
    return torch.cat([out[1], out[0]])


def test_separate_calls_order_free_and_equal_to_batched_without_align_batch(tiny):
    _unet, base = tiny
    x, ctx = _video()
    for align in (True, False):
        node = vidtome_node(base, chunk_size=2, seed=8, align_batch=align)
        cond_first, uncond_first = _separate(node, x, ctx, 0), _separate(node, x, ctx, 1)
        assert torch.equal(cond_first, uncond_first)
        batched = run_unet(node, x, T, ctx, cond_or_uncond=[1, 0])
        if not align:  # one map per half: splitting the batch changes nothing
            torch.testing.assert_close(cond_first, batched, rtol=0, atol=1e-5)
        else:  # a shared map needs both halves in one call (documented limitation)
            assert not torch.allclose(cond_first, batched, atol=1e-5)


def test_nothing_merged_is_exact_and_input_model_untouched(tiny):
    """chunk_size 1 with both ratios 0: plain per-frame attention, bit for bit."""
    _unet, base = tiny
    x, ctx = _video()
    opts = {"cond_or_uncond": [1, 0]}
    ref = run_unet(base, x, T, ctx, **opts)
    node = vidtome_node(base, chunk_size=1, local_ratio=0.0, global_ratio=0.0)
    assert node is not base and not base.object_patches
    assert torch.equal(run_unet(node, x, T, ctx, **opts), ref)
    merged = run_unet(vidtome_node(base), x, T, ctx, **opts)
    assert not torch.allclose(merged, ref, atol=1e-4)
    assert torch.equal(run_unet(base, x, T, ctx, **opts), ref)  # object patches undone


def test_latest_tomesd_node_replaces_earlier_one(tiny):
    """VidToMe over ToMe or importance, ToMe over VidToMe, VidToMe twice: only the latest acts."""
    from comfy_env import tome_node

    from tomesd_ext.comfy.vidtome import VidToMeAttention

    _unet, base = tiny
    x, ctx = _video()
    opts = {"cond_or_uncond": [1, 0]}
    vid = vidtome_node(base, seed=2)
    vid_over_tome = vidtome_node(tome_node(base, ratio=0.5, merge_mlp=True), seed=2)
    assert set(vid_over_tome.object_patches) == set(vid.object_patches)
    assert all(isinstance(p, VidToMeAttention) for p in vid_over_tome.object_patches.values())
    assert not vid_over_tome.model_options.get("transformer_options", {}).get("patches")
    assert torch.equal(run_unet(vid_over_tome, x, T, ctx, **opts), run_unet(vid, x, T, ctx, **opts))
    tome = tome_node(base, ratio=0.5, seed=1)
    tome_over_vid = tome_node(vid, ratio=0.5, seed=1)
    assert not tome_over_vid.object_patches
    assert torch.equal(run_unet(tome_over_vid, x, T, ctx, **opts), run_unet(tome, x, T, ctx, **opts))
    from comfy_env import importance_node

    vid_over_importance = vidtome_node(importance_node(base, ratio=0.5), seed=2)
    assert not vid_over_importance.model_options.get("sampler_post_cfg_function")
    assert not vid_over_importance.model_options.get("transformer_options", {}).get("patches")
    assert set(vid_over_importance.object_patches) == set(vid.object_patches)
    twice = vidtome_node(vidtome_node(base, seed=9, chunk_size=3), seed=2)
    assert all(type(p.inner).__name__ == "CrossAttention" for p in twice.object_patches.values())
    assert torch.equal(run_unet(twice, x, T, ctx, **opts), run_unet(vid, x, T, ctx, **opts))


def test_start_end_percent_window(tiny):
    _unet, base = tiny
    x, ctx = _video()
    opts = {"cond_or_uncond": [1, 0]}
    sigma_mid = float(base.get_model_object("model_sampling").percent_to_sigma(0.5))
    ref = run_unet(base, x, T, ctx, sigma=sigma_mid * 2, **opts)
    late = vidtome_node(base, start_percent=0.5, end_percent=1.0)
    assert torch.equal(run_unet(late, x, T, ctx, sigma=sigma_mid * 2, **opts), ref)  # before start
    assert not torch.allclose(run_unet(late, x, T, ctx, sigma=sigma_mid / 2, **opts), ref, atol=1e-4)


def test_unsupported_model_passes_through_with_one_warning(tiny, caplog):
    model = fake_dit_model()
    with caplog.at_level(logging.WARNING, logger="tomesd_ext"):
        assert vidtome_node(model) is model
    warnings = [r for r in caplog.records if r.name == "tomesd_ext"]
    assert len(warnings) == 1 and "FakeDiT" in warnings[0].getMessage()
