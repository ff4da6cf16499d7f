"""apply_tome(mode="importance") on diffusers' video transformers (Wan, HunyuanVideo, LTX-Video)."""

import warnings

import pytest
import torch

from tomesd_ext import apply_tome, remove_tome
from tomesd_ext.core import importance_partitions
from tomesd_ext.core.importance import partition_counts

from .dit_models import VIDEO_FAMILIES, make_video

F, H, W = 5, 6, 5  # odd frames: with st=2 the last frame is a slab of its own
ATTENTION = {
    "wan": lambda m: m.blocks[0].attn1,
    "hunyuan-video": lambda m: m.transformer_blocks[0].attn,
    "ltx-video": lambda m: m.transformer_blocks[0].attn1,
}


def run(m, kw, sample):
    with torch.no_grad():
        return sample(m(**kw))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def cfg(kw):
    """The call as a CFG batch: the same latent (and text, here) twice, as halves."""
    return {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in kw.items()}


def at_step(kw, scale):
    t = kw["timestep"]
    return dict(kw, timestep=(t * scale).to(t.dtype))


def tokens_seen(m, family):
    seen = []
    ATTENTION[family](m).register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True
    )
    return seen


def token_map(out):
    """The expected map of a CFG output (halves) at the F x H x W token grid."""
    if out.ndim == 3:  # LTX-Video: packed tokens (patch 1)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], F, H, W)
    diff = (out[1] - out[0]).abs().mean(0, keepdim=True)  # (1, frames, rows, cols)
    return torch.nn.functional.avg_pool3d(diff, (1, diff.shape[2] // H, diff.shape[3] // W))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_cfg_batch_merges_with_the_map_of_the_previous_step(family):
    m, kw, sample = make_video(family, frames=F, h=H, w=W)
    calls = [cfg(at_step(kw, s)) for s in (1.0, 0.8, 0.6)]
    refs = [run(m, c, sample) for c in calls]
    apply_tome(m, 0.0, mode="importance", seed=0, min_tokens=0)
    assert all(torch.equal(run(m, c, sample), r) for c, r in zip(calls, refs))  # ratio 0 is the model
    apply_tome(m, 0.5, mode="importance", seed=0, min_tokens=0, pool_factor=1.0)
    policy = m._tomesd_ext_patch.policy
    seen = tokens_seen(m, family)
    first = run(m, calls[0], sample)
    assert policy.counts["importance"] == 0 and policy.counts["tome"] > 0  # step 0 has no map
    torch.testing.assert_close(policy.hmap, token_map(first))  # rows 0 and 1 paired
    hmap = policy.hmap
    second = run(m, calls[1], sample)
    assert policy.counts["importance"] > 0
    n = F * H * W
    assert seen[-1] == n - int(0.5 * n)  # attention sees the merged tokens
    assert torch.isfinite(second).all() and 0 < rel(second, refs[1]) < 0.5
    # the destinations are the most important tokens of their st-frame slab (pool_factor 1: the
    # pool is the N - r most important tokens)
    (part,) = policy.parts[(F, H, W)]
    imp = hmap.reshape(-1)
    for f0 in range(0, F, 2):
        lo, hi = f0 * H * W, min(f0 + 2, F) * H * W
        _r, n_dst, pool = partition_counts(hi - lo, 0.5, 2, 2, 1.0, min(2, F - f0))
        threshold = imp[lo:hi].sort(descending=True).values[pool - 1]
        dst = part.dst[(part.dst >= lo) & (part.dst < hi)]
        assert dst.numel() == n_dst and (imp[dst] >= threshold).all()
    apply_tome(m, 0.5, mode="tome", seed=0, min_tokens=0)
    run(m, calls[0], sample)
    assert not torch.equal(run(m, calls[1], sample), second)  # the map changed the plan
    remove_tome(m)
    assert all(torch.equal(run(m, c, sample), r) for c, r in zip(calls, refs))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_without_cfg_merges_with_windows_and_warns_once(family):
    m, kw, sample = make_video(family, frames=F, h=H, w=W)
    calls = [at_step(kw, s) for s in (1.0, 0.8, 0.6)]
    ref = run(m, calls[1], sample)
    apply_tome(m, 0.5, mode="tome", seed=0, min_tokens=0)
    tome = [run(m, c, sample) for c in calls]
    apply_tome(m, 0.5, mode="importance", seed=0, min_tokens=0)
    seen = tokens_seen(m, family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [run(m, c, sample) for c in calls]
    said = [w for w in caught if "not a classifier-free-guidance pair" in str(w.message)]
    assert len(said) == 1
    assert m._tomesd_ext_patch.policy.counts["importance"] == 0
    assert all(torch.equal(o, t) for o, t in zip(outs, tome))
    assert seen[-1] == F * H * W - int(0.5 * F * H * W) and 0 < rel(outs[1], ref) < 0.5
    remove_tome(m)
    assert torch.equal(run(m, calls[1], sample), ref)


def test_separate_cond_and_uncond_calls_keep_first_frame_and_frame_reach():
    """Wan's pipeline calls the transformer for cond, then uncond: the pair gives the map; the kept
    first frame is not in it, and frame_reach=0 keeps every merge inside its frame."""
    m, kw, sample = make_video("wan", frames=F, h=H, w=W)
    apply_tome(m, 0.5, mode="importance", seed=0, min_tokens=0, keep_first_frame=True, st=1, frame_reach=0)
    policy = m._tomesd_ext_patch.policy
    plans = []
    original = policy.plan

    def recording(metric, h, w, seed, **video):
        plan = original(metric, h, w, seed, **video)
        plans.append(plan)
        return plan

    policy.plan = recording
    uncond = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"] * 0)
    outs = []
    for s in (1.0, 0.8):
        outs += [run(m, at_step(kw, s), sample), run(m, at_step(uncond, s), sample)]
    assert policy.counts["importance"] > 0
    diff = (outs[3] - outs[2]).abs().mean(1, keepdim=True)[0]  # (1, F, 2H, 2W)
    expected = torch.nn.functional.avg_pool3d(diff, (1, 2, 2))[:, 1:]  # the first frame is kept
    torch.testing.assert_close(policy.hmap, expected)
    plan = plans[-1]
    (part,) = policy.parts[(F - 1, H, W)]
    frame = torch.arange((F - 1) * H * W) // (H * W)
    member = plan.group[0]
    merged = member < part.dst.numel()
    anchor_frame = part.dst[member[merged]] // (H * W)
    assert torch.equal(anchor_frame, frame[merged]) and merged.sum() > part.dst.numel()


def test_video_partition_is_one_destination_per_window_in_the_low_ratio_regime():
    f, h, w, st = 5, 6, 4, 2
    imp = torch.rand(1, f * h * w, generator=torch.Generator().manual_seed(0))
    (part,) = importance_partitions(imp, h, w, 0.2, 2, 2, 1.4, seed=3, frames=f, st=st)
    dst = part.dst
    fr, rows, cols = dst // (h * w), (dst % (h * w)) // w, dst % w
    windows = set(zip((fr // st).tolist(), (rows // 2).tolist(), (cols // 2).tolist()))
    assert dst.numel() == 3 * (h // 2) * (w // 2) == len(windows)  # the trailing frame is a window too
    assert part.r == int(0.2 * f * h * w) and (part.priority == 0).all()  # the pool is the clip
