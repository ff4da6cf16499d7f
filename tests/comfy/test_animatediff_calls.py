"""The ComfyUI adapter's reading of an AnimateDiff-Evolved UNet call (tomesd_ext/comfy/animatediff.py)
without running a model: the transformer_options AnimateDiff-Evolved's sampling hands the UNet
(``ad_params``: full_length, context_length, sub_idxs; ComfyUI's ``cond_or_uncond`` chunks) make
the frames of a call one clip, whose frames share one merge plan, and importance mode use the
window's frames of the per-frame map. test_server_animatediff.py runs the real pack."""

import pytest
import torch

from comfy_env import patch_state
from tomesd_ext.comfy.animatediff import clip_call
from tomesd_ext.comfy.importance import importance_state
from tomesd_ext.comfy.tome import Attn1Patch
from tomesd_ext.core import ToMeOptions

H = W = 8
EXTRA = {"block": ("input", 1), "block_index": 0}


def options(full=12, window=None, chunks=(1, 0)):
    ad = {"full_length": full, "context_length": window or full, "sub_idxs": None if window is None else list(window)}
    return {"cond_or_uncond": list(chunks), "ad_params": ad}


def latent(rows):
    return torch.zeros(rows, 4, H, W)


def test_clip_call_reads_the_window_and_the_chunks():
    got = clip_call(latent(16), options(12, range(4, 12)))
    assert (got.chunks, got.frames, got.frame_idx, got.full_length) == (2, 8, list(range(4, 12)), 12)
    got = clip_call(latent(12), options(12, chunks=(0,)))  # no windows: the whole clip, one chunk
    assert (got.chunks, got.frames, got.frame_idx) == (1, 12, list(range(12)))
    assert clip_call(latent(16), {"cond_or_uncond": [1, 0]}) is None  # no AnimateDiff: an image batch
    assert clip_call(latent(16), options(12)) is None  # 8 rows per chunk but a 12-frame clip
    assert clip_call(latent(15), options(12, range(4, 12))) is None  # rows not whole chunks
    assert clip_call(latent(16), options(10, range(4, 12))) is None  # window beyond the clip
    assert clip_call(latent(16), None) is None


def _plan_groups(opts, transformer_options, rows=16, seed=0):
    state = patch_state(opts, 1)
    state.begin_call(latent(rows), torch.tensor([500.0]), None, transformer_options)
    n = torch.randn(rows, H * W, 16, generator=torch.Generator().manual_seed(seed))
    Attn1Patch(state)(n, n, n, EXTRA)
    return state, state.slot.plan.group.view(2, rows // 2, -1)


@pytest.mark.parametrize("frame_plan", ["shared", "per-frame"])
def test_window_frames_share_one_plan_per_chunk(frame_plan):
    opts = ToMeOptions.create(ratio=0.5, seed=3, min_tokens=0, frame_plan=frame_plan)
    state, groups = _plan_groups(opts, options(12, range(4, 12)))
    assert state.runtime.clip_frames == 8
    same = [torch.equal(groups[c, 0], groups[c, f]) for c in range(2) for f in range(1, 8)]
    assert all(same) if frame_plan == "shared" else not all(same)
    _state, images = _plan_groups(opts, {"cond_or_uncond": [1, 0]})  # without AnimateDiff: per image
    assert _state.runtime.clip_frames == 1
    assert not all(torch.equal(images[c, 0], images[c, f]) for c in range(2) for f in range(1, 8))


@pytest.mark.parametrize("frame_plan", ["shared", "per-frame"])
def test_importance_uses_the_window_frames_of_the_clip_map(frame_plan):
    opts = ToMeOptions.create(ratio=0.5, seed=3, min_tokens=0, frame_plan=frame_plan, mode="importance")
    state = importance_state(opts, 1)
    policy = state.policy
    hmap = torch.rand(12, H, W)
    policy.set_map(hmap, 600.0)
    window = list(range(4, 12))
    state.begin_call(latent(16), torch.tensor([500.0]), None, options(12, window, chunks=(0, 1)))
    if frame_plan == "per-frame":  # frame f of the window: its uncond row f and cond row 8 + f
        assert torch.equal(policy.active, hmap[window])
        assert [r.tolist() for r in policy.rows] == [[f, 8 + f] for f in range(8)]
    else:
        assert torch.allclose(policy.active, hmap[window].mean(0, keepdim=True))
        assert [r.tolist() for r in policy.rows] == [[0, 1]]
    n = torch.randn(16, H * W, 16, generator=torch.Generator().manual_seed(1))
    Attn1Patch(state)(n, n, n, EXTRA)
    assert policy.counts == {"importance": 1, "tome": 0}
    groups = state.slot.plan.group.view(2, 8, -1)
    if frame_plan == "shared":
        assert all(torch.equal(groups[c, 0], groups[c, f]) for c in range(2) for f in range(8))


def test_a_window_call_plans_as_apply_tome_plans_a_clip(monkeypatch):
    """Adapter parity: the merge plans apply_tome computes in a diffusers UNetMotionModel (tiny,
    seeded) for a CFG clip of 8 frames are the plans the node's attn1 patch computes from the
    same block inputs in a ComfyUI call of that clip (uncond and cond chunks of 8 frames, the
    AnimateDiff-Evolved transformer_options, the same timestep)."""
    from tomesd_ext.core import MergeRuntime
    from tomesd_ext.diffusers import apply_tome
    from tomesd_ext.models import build_motion_unet

    seen = []
    plan_for = MergeRuntime.plan_for

    def spy(self, metric, scope=None):
        plan = plan_for(self, metric, scope)
        if plan is not None:
            seen.append((metric.clone(), plan))
        return plan

    monkeypatch.setattr(MergeRuntime, "plan_for", spy)
    unet = build_motion_unet("tiny-animatediff", seed=0)
    apply_tome(unet, ratio=0.5, seed=3, min_tokens=0, max_downsample=1)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, H, W, generator=g).repeat(2, 1, 1, 1, 1)  # uncond clip, cond clip
    text = torch.randn(16, 7, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        unet(sample, torch.tensor(500), encoder_hidden_states=text)
    monkeypatch.setattr(MergeRuntime, "plan_for", plan_for)
    assert seen and all(plan.batch == 16 for _m, plan in seen)
    opts = ToMeOptions.create(ratio=0.5, seed=3, min_tokens=0, max_downsample=1)
    state = patch_state(opts, 1)
    state.begin_call(latent(16), torch.tensor([500.0]), None, options(8, chunks=(0, 1)))
    for i, (metric, plan) in enumerate(seen):
        Attn1Patch(state)(metric, metric, metric, {"block": ("input", i), "block_index": 0})
        node = state.slot.plan
        assert torch.equal(node.group, plan.group) and torch.equal(node.size, plan.size), i
