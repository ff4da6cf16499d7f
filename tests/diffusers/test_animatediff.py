"""apply_tome on AnimateDiff: a UNetMotionModel (tiny UNet + tiny motion adapter) and the AnimateDiff
pipelines. Spatial self-attention merges per frame with one plan per clip (frame_plan "shared") or
per frame; the motion modules' temporal attention sees every frame."""

import pytest
import torch
from PIL import Image

from tomesd_ext.core import MergeRuntime, OptionError
from tomesd_ext.diffusers import apply_query_merge, apply_todo, apply_tome, apply_vidtome, remove_tome, tome_options
from tomesd_ext.diffusers.processors import WrappedProcessor
from tomesd_ext.diffusers.tome import PATCH_ATTR
from tomesd_ext.models import build_animatediff_pipeline, build_motion_unet

HW = 8  # latent side: 64 tokens per frame at the merged level, fast on CPU


@pytest.fixture(scope="module")
def motion_unet():
    return build_motion_unet("tiny-animatediff", seed=0)


def clip_inputs(unet, clips=1, frames=8, cfg=True, seed=0):
    """(sample (B, 4, F, HW, HW), text (B*F, 7, D)): B = 2*clips with CFG (halves: the latents
    twice, uncond text first), else clips."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(clips, 4, frames, HW, HW, generator=g)
    text = torch.randn(clips * frames, 7, unet.config.cross_attention_dim, generator=g)
    if cfg:
        sample = torch.cat([sample, sample])
        text = torch.cat([torch.randn(text.shape, generator=g), text])
    return sample, text


def run(unet, inputs):
    sample, text = inputs
    with torch.no_grad():
        return unet(sample, torch.tensor(500), encoder_hidden_states=text).sample


@pytest.fixture
def plans(monkeypatch):
    """Every MergeRuntime.plan_for of the test: (clip_frames, metric rows, plan or None)."""
    seen = []
    plan_for = MergeRuntime.plan_for

    def spy(self, metric, scope=None):
        plan = plan_for(self, metric, scope)
        seen.append((self.clip_frames, metric.shape[0], plan))
        return plan

    monkeypatch.setattr(MergeRuntime, "plan_for", spy)
    return seen


def merged(seen):
    return [(f, rows, p) for f, rows, p in seen if p is not None]


def processors(unet):
    return {name: type(p) for name, p in unet.attn_processors.items()}


def test_ratio_zero_is_exact_and_removal_restores(motion_unet):
    inputs = clip_inputs(motion_unet, clips=1, frames=8)
    before = processors(motion_unet)
    ref = run(motion_unet, inputs)
    for mode in ("tome", "importance"):
        apply_tome(motion_unet, 0.0, seed=1, mode=mode)
        assert torch.equal(run(motion_unet, inputs), ref), mode
    apply_tome(motion_unet, 0.5, seed=1)
    assert tome_options(motion_unet).frame_plan == "shared"
    assert not torch.allclose(run(motion_unet, inputs), ref, atol=1e-4)
    remove_tome(motion_unet)
    assert tome_options(motion_unet) is None and processors(motion_unet) == before
    assert torch.equal(run(motion_unet, inputs), ref)


@pytest.mark.parametrize("frames", [8, 16, 24])
@pytest.mark.parametrize("clips", [1, 2])
@pytest.mark.parametrize("cfg", [True, False])
def test_shared_plan_gives_every_frame_of_a_clip_the_same_groups(motion_unet, plans, frames, clips, cfg):
    apply_tome(motion_unet, 0.5, seed=3)
    try:
        out = run(motion_unet, clip_inputs(motion_unet, clips, frames, cfg))
    finally:
        remove_tome(motion_unet)
    assert out.shape == (clips * (1 + cfg), 4, frames, HW, HW) and torch.isfinite(out).all()
    rows = clips * (1 + cfg) * frames
    assert merged(plans) and all(f == frames and n == rows for f, n, _p in plans)
    for _f, _n, plan in merged(plans):
        assert plan.n_groups < plan.n_tokens
        for tensor in (plan.group, plan.size, plan.anchor):
            per_clip = tensor.view(rows // frames, frames, -1)
            assert torch.equal(per_clip, per_clip[:, :1].expand_as(per_clip))


def test_per_frame_plans_may_differ_between_frames(motion_unet, plans):
    frames = 8
    apply_tome(motion_unet, 0.5, seed=3, frame_plan="per-frame")
    try:
        run(motion_unet, clip_inputs(motion_unet, 1, frames, cfg=True))
    finally:
        remove_tome(motion_unet)
    groups = [p.group.view(2, frames, -1) for _f, _n, p in merged(plans)]
    assert groups and all(f == frames for f, _n, _p in plans)
    assert any(not torch.equal(g[c, 0], g[c, i]) for g in groups for c in range(2) for i in range(1, frames))


def test_clips_are_planned_apart(motion_unet):
    """Clip 0's output does not depend on clip 1 (plans are per clip, rows b*F.. b*F+F-1), while
    merging changes it."""
    frames = 8
    a_sample, a_text = clip_inputs(motion_unet, 2, frames, cfg=False, seed=0)
    b_sample, b_text = clip_inputs(motion_unet, 2, frames, cfg=False, seed=1)
    b_sample[0], b_text[:frames] = a_sample[0], a_text[:frames]  # same clip 0, another clip 1
    ref = run(motion_unet, (a_sample, a_text))[0]
    for frame_plan in ("shared", "per-frame"):
        apply_tome(motion_unet, 0.5, seed=3, frame_plan=frame_plan)
        try:
            out_a = run(motion_unet, (a_sample, a_text))[0]
            out_b = run(motion_unet, (b_sample, b_text))[0]
        finally:
            remove_tome(motion_unet)
        assert torch.allclose(out_a, out_b, atol=1e-6, rtol=0), frame_plan
        assert not torch.allclose(out_a, ref, atol=1e-4), frame_plan


def test_temporal_attention_is_not_merged(motion_unet):
    frames, clips = 16, 2
    temporal = [m for name, m in motion_unet.named_modules() if "motion_modules" in name and hasattr(m, "processor")]
    spatial = [m for name, m in motion_unet.named_modules() if ".attentions." in name and name.endswith("attn1")]
    seen = []
    handles = [m.register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0].shape if args else kw["hidden_states"].shape),
                                           with_kwargs=True) for m in temporal]
    apply_tome(motion_unet, 0.5, seed=3)
    try:
        assert all(isinstance(m.processor, WrappedProcessor) for m in spatial)
        assert not any(isinstance(m.processor, WrappedProcessor) for m in temporal)
        run(motion_unet, clip_inputs(motion_unet, clips, frames, cfg=False))
    finally:
        remove_tome(motion_unet)
        for h in handles:
            h.remove()
    assert seen and all(shape[1] == frames for shape in seen)
    # every spatial position of every clip: (clips * h * w, frames, C) at each level
    assert {shape[0] for shape in seen} == {clips * (HW // d) ** 2 for d in (1, 2, 4)}


@pytest.mark.parametrize("frame_plan", ["shared", "per-frame"])
def test_importance_mode_pairs_cond_and_uncond_of_the_same_frame(motion_unet, plans, frame_plan):
    frames, clips = 8, 2
    inputs = clip_inputs(motion_unet, clips, frames, cfg=True)
    apply_tome(motion_unet, 0.5, seed=3, mode="importance", frame_plan=frame_plan)
    try:
        policy = motion_unet.__dict__[PATCH_ATTR].policy
        run(motion_unet, inputs)  # step 1: ToMe windows, the map of its output kept
        first = policy.hmap
        assert first.shape == (clips * frames, HW, HW)  # one map per clip frame
        with torch.no_grad():
            out = motion_unet(inputs[0], torch.tensor(400), encoder_hidden_states=inputs[1]).sample
    finally:
        remove_tome(motion_unet)
    assert torch.isfinite(out).all()
    assert policy.counts["importance"] > 0
    if frame_plan == "per-frame":  # image i*F + f: frame f of uncond clip i and of cond clip i
        expected = [[i * frames + f, (clips + i) * frames + f] for i in range(clips) for f in range(frames)]
        assert policy.active is first
    else:  # one image per clip pair, its map the mean over the clip's frames
        expected = [[i, clips + i] for i in range(clips)]
        assert torch.allclose(policy.active, first.view(clips, frames, HW, HW).mean(1))
    assert [r.tolist() for r in policy.rows] == expected
    if frame_plan == "shared":
        for _f, rows, plan in merged(plans):
            per_clip = plan.group.view(rows // frames, frames, -1)
            assert torch.equal(per_clip, per_clip[:, :1].expand_as(per_clip))


def test_query_merge_shares_the_clip_plan_too(motion_unet, plans):
    frames = 8
    inputs = clip_inputs(motion_unet, 1, frames)
    ref = run(motion_unet, inputs)
    apply_query_merge(motion_unet, 0.3, seed=3)
    try:
        out = run(motion_unet, inputs)
    finally:
        remove_tome(motion_unet)
    assert merged(plans) and not torch.allclose(out, ref, atol=1e-4)
    for _f, rows, plan in merged(plans):
        per_clip = plan.group.view(rows // frames, frames, -1)
        assert torch.equal(per_clip, per_clip[:, :1].expand_as(per_clip))


def test_bad_frame_plan_and_other_methods_are_refused(motion_unet):
    before = processors(motion_unet)
    with pytest.raises(OptionError, match="frame_plan='frames'.*shared"):
        apply_tome(motion_unet, 0.5, frame_plan="frames")
    for apply in (apply_todo, apply_vidtome):
        with pytest.raises(TypeError, match="UNetMotionModel.*no AnimateDiff support"):
            apply(motion_unet)
    assert tome_options(motion_unet) is None and processors(motion_unet) == before


FRAMES = 4
_BLANK = [Image.new("RGB", (64, 64), (90, 120, 150))]
PIPELINES = {  # kind -> (model, extra call arguments)
    "txt2img": ("tiny-animatediff", {"num_frames": FRAMES}),
    "video2video": ("tiny-animatediff", {"video": _BLANK * FRAMES, "strength": 0.9}),
    "controlnet": ("tiny-animatediff", {"num_frames": FRAMES, "conditioning_frames": _BLANK * FRAMES}),
    "sparsectrl": ("tiny-animatediff", {"num_frames": FRAMES, "conditioning_frames": _BLANK, "controlnet_frame_indices": [0]}),
    "video2video-controlnet": ("tiny-animatediff", {"video": _BLANK * FRAMES, "strength": 0.9,
                                                    "conditioning_frames": _BLANK * FRAMES}),
    "sdxl": ("tiny-sdxl-animatediff", {"num_frames": FRAMES}),
}


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_pipelines_are_patched_through_their_unet(kind, plans):
    name, extra = PIPELINES[kind]
    pipe = build_animatediff_pipeline(name, "txt2img" if kind == "sdxl" else kind, seed=0)
    before = processors(pipe.unet)
    apply_tome(pipe, 0.5, seed=2, max_downsample=2)
    assert tome_options(pipe).ratio == 0.5
    frames = pipe(prompt="a cat", num_inference_steps=2, height=64, width=64, output_type="latent",
                  generator=torch.Generator().manual_seed(0), **extra).frames
    assert frames.shape[2] == FRAMES and torch.isfinite(frames).all()
    assert merged(plans) and all(f == FRAMES for f, _n, _p in plans)
    assert {n for _f, n, _p in plans} == {2 * FRAMES}  # CFG: uncond and cond clips
    remove_tome(pipe)
    assert tome_options(pipe) is None and processors(pipe.unet) == before


def test_block_mode_keeps_clip_plans_and_temporal_attention(motion_unet, plans):
    """unet_mode="block" on a UNetMotionModel: exact at ratio 0 and after removal; the spatial
    blocks run on merged tokens with one plan per clip; the motion modules see every frame."""
    frames, clips = 8, 2
    inputs = clip_inputs(motion_unet, clips, frames, cfg=True)
    ref = run(motion_unet, inputs)
    temporal = [m for name, m in motion_unet.named_modules() if "motion_modules" in name and hasattr(m, "processor")]
    seen = []
    handles = [m.register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0].shape if args else kw["hidden_states"].shape),
                                           with_kwargs=True) for m in temporal]
    try:
        apply_tome(motion_unet, 0.0, seed=3, unet_mode="block")
        assert torch.equal(run(motion_unet, inputs), ref)
        apply_tome(motion_unet, 0.5, seed=3, unet_mode="block")
        seen.clear()
        out = run(motion_unet, inputs)
    finally:
        remove_tome(motion_unet)
        for h in handles:
            h.remove()
    assert not torch.allclose(out, ref, atol=1e-4)
    assert seen and all(shape[1] == frames for shape in seen)
    rows = 2 * clips * frames
    assert merged(plans)
    for _f, _n, plan in merged(plans):
        per_clip = plan.group.view(rows // frames, frames, -1)
        assert torch.equal(per_clip, per_clip[:, :1].expand_as(per_clip))
    assert torch.equal(run(motion_unet, inputs), ref)
