"""Core pieces of merging a batch of clips run frame by frame (AnimateDiff): the clip metric, plans
repeated over a clip's frames, the runtime's shared and per-frame plans, and the importance map
and rows of a clip batch."""

import pytest
import torch

from tomesd_ext.core import ImportancePolicy, MergeRuntime, TomePolicy, ToMeOptions, importance_map
from tomesd_ext.core.importance import image_rows
from tomesd_ext.core.matching import clip_metric, normalize_metric

H = W = 8


def metric(rows, seed=0, c=16):
    return torch.randn(rows, H * W, c, generator=torch.Generator().manual_seed(seed))


def runtime(frame_plan, clip_frames, mode="tome"):
    opts = ToMeOptions.create(ratio=0.5, seed=5, min_tokens=0, frame_plan=frame_plan, mode=mode)
    rt = MergeRuntime(ImportancePolicy(opts) if mode == "importance" else TomePolicy(opts), 1)
    rt.begin_call((H, W), 1.0, clip_frames=clip_frames)
    return rt


def test_clip_metric_is_the_mean_of_the_normalised_frames():
    m = metric(6)
    got = clip_metric(m, 3)
    want = torch.stack([normalize_metric(m[i * 3:(i + 1) * 3]).mean(0) for i in range(2)])
    assert got.shape == (2, H * W, 16) and torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="7 rows.*3-frame"):
        clip_metric(metric(7), 3)


def test_shared_plan_is_the_per_frame_plan_when_frames_are_equal():
    frame = metric(2)
    m = frame.repeat_interleave(4, dim=0)  # two clips of four identical frames
    shared = runtime("shared", 4).plan_for(m)
    per_frame = runtime("per-frame", 4).plan_for(m)
    assert torch.equal(shared.group, per_frame.group) and torch.equal(shared.size, per_frame.size)


def test_shared_plan_repeats_the_clip_plan_over_its_frames():
    m = metric(8)
    plan = runtime("shared", 4).plan_for(m)
    clips = TomePolicy(runtime("shared", 4).opts).plan(clip_metric(m, 4), H, W, runtime("shared", 4)._seed(1, H, W))
    assert torch.equal(plan.group, clips.group.repeat_interleave(4, dim=0))
    assert torch.equal(plan.anchor, clips.anchor.repeat_interleave(4, dim=0))
    per_frame = runtime("per-frame", 4).plan_for(m).group.view(2, 4, -1)
    assert any(not torch.equal(per_frame[c, 0], per_frame[c, i]) for c in range(2) for i in range(1, 4))
    images = runtime("shared", 1).plan_for(m).group  # not a clip call: the image path, unchanged
    assert torch.equal(images, runtime("per-frame", 1).plan_for(m).group)


def test_importance_map_of_a_clip_batch_pairs_the_same_frame():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(4, 3, 5, H, W, generator=g)  # 2 clip pairs, 5 frames
    frames = [pred[:, :, f] for f in range(5)]
    for layout in ("halves", "interleaved"):
        per_frame = torch.stack([importance_map(x, layout) for x in frames], dim=1)  # (2, 5, H, W)
        assert torch.equal(importance_map(pred, layout), per_frame)


@pytest.mark.parametrize("layout, clip_pairs", [("halves", [[0, 2], [1, 3]]), ("interleaved", [[0, 1], [2, 3]])])
def test_image_rows_of_clip_frames(layout, clip_pairs):
    rows = image_rows(4 * 3, layout, frames=3)  # 4 clips (2 pairs) of 3 frames
    want = [[a * 3 + f, b * 3 + f] for a, b in clip_pairs for f in range(3)]
    assert [r.tolist() for r in rows] == want


def test_importance_policy_uses_a_clip_batch_map():
    hmap = torch.rand(2 * 3, H, W)  # 2 clip pairs x 3 frames
    for frame_plan, images in (("shared", 2), ("per-frame", 6)):
        rt = runtime(frame_plan, 3, mode="importance")
        policy = rt.policy
        policy.set_map(hmap, 2.0)
        policy.use_clip_map("halves", 4, 3, (H, W), "cpu")
        assert len(policy.rows) == images
        want = hmap if frame_plan == "per-frame" else hmap.view(2, 3, H, W).mean(1)
        assert torch.equal(policy.active, want)
        plan = rt.plan_for(metric(12))
        assert plan.batch == 12 and policy.counts["importance"] == 1
        policy.advance(1.0)  # the next call, of another latent size: the map does not fit
        policy.use_clip_map("halves", 4, 3, (H, W + 1), "cpu")
        assert policy.active is None


@pytest.mark.parametrize("frame_plan", ["shared", "per-frame"])
def test_importance_policy_uses_a_window_of_a_longer_clip(frame_plan):
    """One clip of 7 frames whose map is stored (7, H, W); a call runs frames 2..5 of it as two
    chunks (cond, uncond) of 4 rows, as ComfyUI runs an AnimateDiff context window (images=1)."""
    hmap = torch.rand(7, H, W)
    window = [2, 3, 4, 5]
    rt = runtime(frame_plan, 4, mode="importance")
    policy = rt.policy
    policy.set_map(hmap, 2.0)
    policy.use_clip_map("halves", 2, 4, (H, W), "cpu", images=1, frame_idx=window)
    if frame_plan == "per-frame":  # frame f: rows f (first chunk) and 4 + f (second)
        assert [r.tolist() for r in policy.rows] == [[f, 4 + f] for f in range(4)]
        assert torch.equal(policy.active, hmap[window])
    else:  # the two chunk rows of the clip metric, one map: the window's mean
        assert [r.tolist() for r in policy.rows] == [[0, 1]]
        assert torch.allclose(policy.active, hmap[window].mean(0, keepdim=True))
    plan = rt.plan_for(metric(8))
    assert plan.batch == 8 and policy.counts["importance"] == 1
    for bad in ([5, 6, 7, 8], [0, 1, 2]):  # beyond the stored frames; not `frames` of them
        policy.active = None
        policy.use_clip_map("halves", 2, 4, (H, W), "cpu", images=1, frame_idx=bad)
        assert policy.active is None
