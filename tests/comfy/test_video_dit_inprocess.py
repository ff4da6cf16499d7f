"""The ToMe node on ComfyUI's own video transformers (Wan 2.1, HunyuanVideo, LTX-Video; tiny
random weights): exactness at ratio 0, the input MODEL left alone, odd frame counts and sizes,
batches, keep_first_frame (image-to-video token replace), and parity with the diffusers adapter
on the same Wan weights."""

import logging

import pytest
import torch

from comfy_env import import_comfy, tome_node
from dit_models import assert_same_merge, recorded_plans, run_dit
from video_dit_models import (diffusers_ltx_from_comfy, diffusers_wan_from_comfy, run_diffusers_ltx, run_diffusers_wan,
                              tiny_comfy_video, video_inputs)

pytestmark = pytest.mark.comfyui

SIGMA = 0.7
FAMILIES = ("wan", "hunyuan", "ltxv")


@pytest.fixture(scope="module")
def models():
    import_comfy()
    return {family: tiny_comfy_video(family) for family in FAMILIES}


def _replaced(patcher):
    return sorted(patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}))


def _block_inputs(patcher, block, call):
    """The token counts of ``block``'s input during call() (a forward pre-hook on the shared
    module, removed after)."""
    seen = []

    def record(module, args, kwargs):
        x = args[0] if args else kwargs.get("x", kwargs.get("img"))
        seen.append(x.shape[1])

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ("block", "kv"))
def test_ratio_zero_exact_and_base_untouched(models, family, mode):
    base = models[family]
    x, ctx, conds = video_inputs(family)
    ref = run_dit(base, x, SIGMA, ctx, **conds)
    assert torch.equal(run_dit(tome_node(base, ratio=0.0, dit_mode=mode), x, SIGMA, ctx, **conds), ref)
    patched = tome_node(base, ratio=0.5, dit_mode=mode)
    assert patched is not base and _replaced(patched) and not _replaced(base)
    assert "optimized_attention_override" not in base.model_options.get("transformer_options", {})
    merged = run_dit(patched, x, SIGMA, ctx, **conds)
    assert torch.isfinite(merged).all() and not torch.allclose(merged, ref, atol=1e-5)
    assert torch.equal(run_dit(base, x, SIGMA, ctx, **conds), ref)  # the shared model is unchanged


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch, thw", [(1, (5, 7, 9)), (3, (2, 6, 10)), (2, (1, 8, 6))])
def test_odd_frames_sizes_and_batches(models, family, batch, thw):
    """Batch 1 (no CFG), 3 (odd), 2 (CFG pair); 5 frames of 7x9 (Wan pads to a 4x5 grid; the
    others are patched by 2 or 1), 2 frames, a single frame."""
    base = models[family]
    if family == "hunyuan" and thw[1] % 2:
        thw = (thw[0], thw[1] + 1, thw[2] + 1)  # HunyuanVideo does not pad the latent
    x, ctx, conds = video_inputs(family, batch=batch, thw=thw)
    ref = run_dit(base, x, SIGMA, ctx, **conds)
    assert torch.equal(run_dit(tome_node(base, ratio=0.0), x, SIGMA, ctx, **conds), ref)
    out = run_dit(tome_node(base, ratio=0.5, seed=3), x, SIGMA, ctx, **conds)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.8, rel


def test_blocks_run_on_fewer_tokens_and_keep_first_frame(models):
    """Wan, 3 latent frames of 4x4 tokens: block inputs shrink to half the grid; with
    keep_first_frame the first frame's 16 tokens stay and half of the other 32 are merged."""
    base = models["wan"]
    block = base.model.diffusion_model.blocks[0]
    x, ctx, _ = video_inputs("wan", thw=(3, 8, 8))
    call = (lambda m: lambda: run_dit(m, x, SIGMA, ctx))
    assert _block_inputs(base, block, call(base)) == [48]
    assert _block_inputs(base, block, call(tome_node(base, ratio=0.5))) == [24]
    assert _block_inputs(base, block, call(tome_node(base, ratio=0.5, keep_first_frame=True))) == [16 + 16]
    # st=1: per-frame windows, a different partition than the default 2-frame windows
    st1 = run_dit(tome_node(base, ratio=0.5, st=1), x, SIGMA, ctx)
    assert not torch.allclose(st1, run_dit(tome_node(base, ratio=0.5), x, SIGMA, ctx), atol=1e-6)


def test_hunyuan_token_replace_needs_keep_first_frame(models, caplog):
    """HunyuanVideo image-to-video token replace (guiding_frame_index): the first frame carries
    its own modulation, so a call merges only when that frame is kept out of the span."""
    base = models["hunyuan"]
    # batch 1: ComfyUI's token-replace modulation broadcasts over one sample only
    x, ctx, conds = video_inputs("hunyuan", batch=1, thw=(3, 8, 8))
    conds["guiding_frame_index"] = torch.zeros(1)
    ref = run_dit(base, x, SIGMA, ctx, **conds)
    with caplog.at_level(logging.WARNING, logger="tomesd_ext"):
        assert torch.equal(run_dit(tome_node(base, ratio=0.5), x, SIGMA, ctx, **conds), ref)
    assert any("keep_first_frame" in r.getMessage() for r in caplog.records)
    kept = run_dit(tome_node(base, ratio=0.5, keep_first_frame=True), x, SIGMA, ctx, **conds)
    assert torch.isfinite(kept).all() and not torch.allclose(kept, ref, atol=1e-5)


def test_hunyuan_blocks_and_skip_ends(models):
    base = models["hunyuan"]
    every = [("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)]
    assert _replaced(tome_node(base, ratio=0.5)) == every
    assert _replaced(tome_node(base, ratio=0.5, skip_ends=1)) == [("double_block", 1), ("single_block", 0)]
    from tomesd_ext.core import OptionError

    with pytest.raises(OptionError, match=r"skip_ends=3 leaves no block to merge: this model has 4 blocks"):
        tome_node(base, ratio=0.5, skip_ends=3)


def _node_and_adapter(base, comfy_call, d, diffusers_call, kw):
    """(ref, out, dref, dout, comfy plans, diffusers plans): ComfyUI's model unpatched and through
    the node, diffusers' model unpatched and under apply_tome, at ratio 0.5, seed 5, block mode
    and ``kw``, and the plans each merged run made.
    comfy_call(patcher) and diffusers_call() run one call on the same input."""
    from tomesd_ext import apply_tome, remove_tome

    ref = comfy_call(base)
    with recorded_plans() as comfy_plans:
        out = comfy_call(tome_node(base, ratio=0.5, seed=5, dit_mode="block", **kw))
    dref = diffusers_call()
    apply_tome(d, 0.5, seed=5, min_tokens=0, dit_mode="block", **kw)
    try:
        with recorded_plans() as diffusers_plans:
            dout = diffusers_call()
    finally:
        remove_tome(d)
    return ref, out, dref, dout, comfy_plans, diffusers_plans


@pytest.mark.parametrize("batch, thw, kw", [
    (2, (3, 8, 8), {}),
    (1, (5, 6, 10), {"st": 1}),
    (2, (4, 8, 6), {"keep_first_frame": True, "st": 3}),
    (1, (5, 6, 10), {"st": 1, "frame_reach": 0}),  # spatial-only
    (2, (5, 8, 8), {"frame_reach": 1}),  # st 2 with a trailing one-frame window
])
def test_wan_block_mode_matches_diffusers_adapter(models, batch, thw, kw):
    """Same Wan weights (diffusers' own conversion of the ComfyUI state dict), input, ratio, seed
    and st: the node's and apply_tome's merged outputs agree to float noise."""
    base = models["wan"]
    d = diffusers_wan_from_comfy(base)
    x, ctx, _ = video_inputs("wan", batch=batch, thw=thw)
    results = _node_and_adapter(base, lambda m: run_dit(m, x, SIGMA, ctx), d,
                                             lambda: run_diffusers_wan(d, x, SIGMA, ctx), kw)
    assert_same_merge(*results)


def test_wan_kv_merges_self_attention_only_when_text_has_the_video_length(models):
    """kv mode on Wan with a 32-token text context and a 2x4x4 = 32-token video: each block's self
    attention gets 16 merged keys, its cross attention all 32 text keys (seen by a foreign
    attention override, which ours calls after merging)."""
    base = models["wan"]
    lengths = []

    def foreign(func, *args, **kwargs):
        k = args[1]
        lengths.append(k.shape[-2] if kwargs.get("skip_reshape") else k.shape[1])
        return func(*args, **kwargs)

    m = base.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = foreign
    x, ctx, _ = video_inputs("wan", thw=(2, 8, 8), n_txt=32)
    run_dit(tome_node(m, ratio=0.5, dit_mode="kv"), x, SIGMA, ctx)
    assert lengths == [16, 32, 16, 32]


@pytest.mark.parametrize("kw", [{}, {"keep_first_frame": True}])
def test_wan22_per_frame_timesteps_match_diffusers_adapter(models, kw):
    """Wan 2.2 (48 channels): a denoise mask gives each latent frame its own timestep, so the
    blocks' modulation is per frame (ComfyUI) / per token (diffusers) and follows the merged
    tokens. Both adapters key the partition on the call's noise level (diffusers: the largest
    per-token timestep; ComfyUI: sigma)."""
    base = tiny_comfy_video("wan22")
    d = diffusers_wan_from_comfy(base)
    x, ctx, _ = video_inputs("wan22", thw=(3, 8, 8))
    scale = torch.tensor([0.0, 1.0, 0.6]).expand(2, 3)  # a clean first (conditioning) frame
    mask = scale[:, None, :, None, None].expand(2, 1, 3, 8, 8).contiguous()
    results = _node_and_adapter(base, lambda m: run_dit(m, x, SIGMA, ctx, denoise_mask=mask), d,
                                             lambda: run_diffusers_wan(d, x, SIGMA, ctx, frame_scale=scale), kw)
    assert_same_merge(*results)


@pytest.mark.parametrize("kw", [{}, {"keep_first_frame": True, "st": 1}])
def test_ltx_block_mode_matches_diffusers_adapter(models, kw):
    """LTX-Video (rotary cos/sin tables gathered at the anchors), 3 latent frames of 4x6 tokens:
    the node and apply_tome agree to float noise (the node keys the partition on ComfyUI's 0-1
    timestep times the model's multiplier, the number diffusers' model takes)."""
    base = models["ltxv"]
    d = diffusers_ltx_from_comfy(base)
    x, ctx, conds = video_inputs("ltxv", thw=(3, 4, 6))
    results = _node_and_adapter(base, lambda m: run_dit(m, x, SIGMA, ctx, **conds), d,
                                             lambda: run_diffusers_ltx(d, x, SIGMA, ctx), kw)
    assert_same_merge(*results)
