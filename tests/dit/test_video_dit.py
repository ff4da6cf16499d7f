"""apply_tome on diffusers' video transformers (Wan, HunyuanVideo, LTX-Video): spatio-temporal merging."""

import pytest
import torch

from tomesd_ext import apply_tome, remove_tome
from tomesd_ext.diffusers import tome_options
from tomesd_ext.core import window_partition

from .dit_models import VIDEO_FAMILIES, make_video


def run(m, kw, sample):
    with torch.no_grad():
        return sample(m(**kw))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("mode", ("block", "attn", "kv"))
def test_ratio_zero_and_removal_exact_odd_frames_and_sizes(family, mode):
    m, kw, sample = make_video(family, frames=5, h=7, w=5)
    ref = run(m, kw, sample)
    apply_tome(m, 0.0, dit_mode=mode, seed=2, min_tokens=0)
    assert torch.equal(run(m, kw, sample), ref)
    apply_tome(m, 0.5, dit_mode=mode, seed=2, min_tokens=0)
    out = run(m, kw, sample)
    assert torch.isfinite(out).all() and 0 < rel(out, ref) < 0.5
    remove_tome(m)
    assert torch.equal(run(m, kw, sample), ref)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_batch_and_cfg_rows(family):
    m, kw, sample = make_video(family, batch=1, frames=3)
    two = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in kw.items()}
    a, b = run(m, two, sample).chunk(2)
    noise = (a - b).abs().max()  # these models' batched kernels differ per row by float noise already
    apply_tome(m, 0.5, seed=0, min_tokens=0)
    a, b = run(m, two, sample).chunk(2)
    assert (a - b).abs().max() <= max(2 * noise, 1e-6)  # one plan for the batch: the rows stay alike
    m3, kw3, _ = make_video(family, batch=3, frames=3)
    apply_tome(m3, 0.5, seed=0, min_tokens=0)
    assert run(m3, kw3, sample).shape[0] == 3


def test_keep_first_frame_leaves_its_tokens_alone():
    f, h, w = 4, 6, 5
    m, kw, sample = make_video("wan", frames=f, h=h, w=w)
    seen = []
    m.blocks[0].attn1.register_forward_pre_hook(lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    apply_tome(m, 0.5, seed=0, min_tokens=0, keep_first_frame=True, dit_mode="block")
    run(m, kw, sample)
    rest = (f - 1) * h * w
    assert seen[-1] == h * w + rest - int(0.5 * rest)
    apply_tome(m, 0.5, seed=0, min_tokens=0, dit_mode="block")
    run(m, kw, sample)
    assert seen[-1] == f * h * w - int(0.5 * f * h * w)


def test_spatio_temporal_windows_have_one_destination_each():
    f, h, w, st, sy, sx = 5, 6, 4, 2, 2, 2
    dst, src = window_partition(h, w, sx, sy, 11, frames=f, st=st)
    # frames 0-1, 2-3 and the trailing frame 4 (a shallower window of its own)
    assert dst.numel() == 3 * (h // sy) * (w // sx) and dst.numel() + src.numel() == f * h * w
    fr, rows, cols = dst // (h * w), (dst % (h * w)) // w, dst % w
    windows = set(zip((fr // st).tolist(), (rows // sy).tolist(), (cols // sx).tolist()))
    assert len(windows) == dst.numel()  # every window holds exactly one destination
    assert len(set((fr % st).tolist())) > 1  # destinations are drawn across the window's frames
    assert (fr == 4).sum() == (h // sy) * (w // sx)  # the trailing frame has destinations
    # the full windows draw as they would without the trailing one
    even = window_partition(h, w, sx, sy, 11, frames=4, st=st)[0]
    assert torch.equal(dst[dst < 4 * h * w], even)
    # frames < st: one window as deep as the clip; an image is the one-frame case
    short = window_partition(h, w, sx, sy, 11, frames=2, st=3)[0]
    assert short.numel() == (h // sy) * (w // sx)
    assert torch.equal(window_partition(8, 6, 2, 2, 5)[0], window_partition(8, 6, 2, 2, 5, frames=1, st=1)[0])


def test_temporal_windows_change_the_plan_and_single_frame_is_an_image():
    m, kw, sample = make_video("wan", frames=4)
    apply_tome(m, 0.5, seed=0, min_tokens=0, st=1)
    spatial = run(m, kw, sample)
    apply_tome(m, 0.5, seed=0, min_tokens=0, st=2)
    assert not torch.equal(run(m, kw, sample), spatial)
    m1, kw1, _ = make_video("wan", frames=1)
    ref = run(m1, kw1, sample)
    apply_tome(m1, 0.5, seed=0, min_tokens=0)
    assert not torch.equal(run(m1, kw1, sample), ref)  # one frame: merged as an image grid


def test_two_expert_pipelines_patch_both_transformers():
    class Pipe:  # Wan 2.2 A14B: transformer (high noise) and transformer_2 (low noise)
        pass

    pipe = Pipe()
    pipe.transformer, kw, sample = make_video("wan", seed=0)
    pipe.transformer_2, _, _ = make_video("wan", seed=1)
    refs = [run(pipe.transformer, kw, sample), run(pipe.transformer_2, kw, sample)]
    apply_tome(pipe, 0.5, seed=0, min_tokens=0)
    outs = [run(pipe.transformer, kw, sample), run(pipe.transformer_2, kw, sample)]
    assert all(not torch.equal(o, r) for o, r in zip(outs, refs))
    remove_tome(pipe)
    assert all(torch.equal(run(t, kw, sample), r) for t, r in zip((pipe.transformer, pipe.transformer_2), refs))


def wan_pipeline(transformer, transformer_2):
    """diffusers' WanPipeline with the given experts; no text encoder, tokenizer or VAE (the tests
    call the transformers themselves)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=transformer, transformer_2=transformer_2, boundary_ratio=0.875)


@pytest.mark.parametrize("experts", ["low-noise only", "both"])
def test_wan22_pipeline_patches_whichever_experts_it_has(experts):
    # diffusers allows transformer=None in a boundary_ratio pipeline: transformer_2 denoises
    low, kw, sample = make_video("wan", seed=1)
    high = make_video("wan", seed=0)[0] if experts == "both" else None
    pipe = wan_pipeline(high, low)
    models = [m for m in (high, low) if m is not None]
    refs = [run(m, kw, sample) for m in models]
    assert apply_tome(pipe, 0.5, seed=0, min_tokens=0) is pipe
    assert tome_options(pipe).ratio == 0.5
    assert all(tome_options(m).ratio == 0.5 for m in models)
    assert all(not torch.equal(run(m, kw, sample), r) for m, r in zip(models, refs))
    apply_tome(pipe, 0.3, seed=0, min_tokens=0)  # applying again replaces the settings of each
    assert all(tome_options(m).ratio == 0.3 for m in models)
    remove_tome(pipe)
    assert tome_options(pipe) is None and all(tome_options(m) is None for m in models)
    assert all(torch.equal(run(m, kw, sample), r) for m, r in zip(models, refs))


def test_frame_reach_limits_matching_to_near_frames():
    from tomesd_ext.core import OptionError, ToMeOptions, bipartite_plan

    f, h, w = 5, 6, 4
    metric = torch.randn(2, f * h * w, 8, generator=torch.Generator().manual_seed(3))
    for st, reach in ((1, 0), (2, 1)):
        dst, src = window_partition(h, w, 2, 2, 7, frames=f, st=st)
        r = src.numel() // 2
        plan = bipartite_plan(metric, dst, src, r, grid=(f, h, w), frame_reach=reach)
        group = plan.group  # (B, N): every token's group; groups [dst | kept sources]
        merged = group[:, src] < dst.numel()  # sources that joined a destination
        assert merged.sum(1).tolist() == [r, r]
        gap = (src // (h * w)).expand(2, -1)[merged] - (dst[group[:, src][merged]] // (h * w))
        assert gap.abs().max() <= reach
        assert (gap != 0).any() == (reach > 0)  # with reach 1, some sources do merge across frames
        # a reach that spans the clip is the global matching, bit for bit
        wide = bipartite_plan(metric, dst, src, r, grid=(f, h, w), frame_reach=f - 1)
        full = bipartite_plan(metric, dst, src, r, grid=(f, h, w))
        assert torch.equal(wide.group, full.group) and torch.equal(wide.size, full.size)
    assert ToMeOptions.create(st=1, frame_reach=0).frame_reach == 0
    with pytest.raises(OptionError, match=r"frame_reach=0 .*\[1, 64\] with st=2"):
        ToMeOptions.create(frame_reach=0)
    with pytest.raises(OptionError, match="frame_reach=65"):
        ToMeOptions.create(frame_reach=65)


def test_frame_reach_on_a_model():
    m, kw, sample = make_video("wan", frames=4)
    ref = run(m, kw, sample)
    apply_tome(m, 0.5, seed=0, min_tokens=0, st=1)
    anywhere = run(m, kw, sample)
    apply_tome(m, 0.5, seed=0, min_tokens=0, st=1, frame_reach=3)  # spans the 4 latent frames
    assert torch.equal(run(m, kw, sample), anywhere)
    apply_tome(m, 0.5, seed=0, min_tokens=0, st=1, frame_reach=0)
    own = run(m, kw, sample)
    assert not torch.equal(own, anywhere) and 0 < rel(own, ref) < 0.5
    remove_tome(m)
    assert torch.equal(run(m, kw, sample), ref)


def _ltx_condition_call(kw, batch, frames, h, w, prefix_frames):
    """The call LTXConditionPipeline makes: no num_frames/height/width, video_coords for every token
    (frame coordinates in seconds), conditioning tokens of a clip at frame 16 before the video, and a
    per-token timestep that is 0 on them."""
    from diffusers import LTXConditionPipeline as P

    def coords(f, frame_index):
        ids = P._prepare_video_ids(batch, f, h, w, patch_size=1, patch_size_t=1)
        return P._scale_video_ids(ids, scale_factor=32, scale_factor_t=8, frame_index=frame_index)

    parts = ([coords(prefix_frames, 16)] if prefix_frames else []) + [coords(frames, 0)]
    video_coords = torch.cat(parts, dim=2).float()
    video_coords[:, 0] = video_coords[:, 0] / 25.0
    lead = prefix_frames * h * w
    g = torch.Generator().manual_seed(5)
    x = kw["hidden_states"]
    prefix = torch.randn(batch, lead, x.shape[2], generator=g)
    timestep = torch.cat([torch.zeros(batch, lead), torch.full((batch, frames * h * w), 500.0)], dim=1)
    call = {k: v for k, v in kw.items() if k not in ("num_frames", "height", "width")}
    return dict(call, hidden_states=torch.cat([prefix, x], dim=1), timestep=timestep, video_coords=video_coords), lead


@pytest.mark.parametrize("prefix_frames", (0, 2))
def test_ltx_call_with_video_coords_merges(prefix_frames):
    f, h, w = 4, 6, 5
    m, kw, sample = make_video("ltx-video", batch=2, frames=f, h=h, w=w)
    call, lead = _ltx_condition_call(kw, 2, f, h, w, prefix_frames)
    ref = run(m, call, sample)
    seen = []
    m.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True
    )
    apply_tome(m, 0.0, seed=0, min_tokens=0)
    assert torch.equal(run(m, call, sample), ref)
    n = f * h * w
    for mode in ("block", "kv"):
        apply_tome(m, 0.5, seed=0, min_tokens=0, dit_mode=mode)
        out = run(m, call, sample)
        assert torch.isfinite(out).all() and 0 < rel(out, ref) < 0.5
        if mode == "block":
            assert seen[-1] == lead + n - int(0.5 * n)  # the conditioning tokens are never merged
    remove_tome(m)
    assert torch.equal(run(m, call, sample), ref)


def test_ltx_video_coords_that_are_no_raster_are_said_once(caplog):
    f, h, w = 3, 4, 5
    m, kw, sample = make_video("ltx-video", batch=1, frames=f, h=h, w=w)
    call, _lead = _ltx_condition_call(kw, 1, f, h, w, 0)
    call["video_coords"] = call["video_coords"].flip(2)  # the last token is now the first position
    ref = run(m, call, sample)
    apply_tome(m, 0.5, seed=0, min_tokens=0)
    with caplog.at_level("WARNING", logger="tomesd_ext"):
        outs = [run(m, call, sample) for _ in range(2)]
    assert all(torch.equal(o, ref) for o in outs)
    said = [r.getMessage() for r in caplog.records if "video_coords" in r.getMessage()]
    assert len(said) == 1 and "ltx-video" in said[0] and "not merged" in said[0]
