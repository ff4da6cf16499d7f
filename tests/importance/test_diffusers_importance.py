"""apply_tome(mode="importance") on tiny random-weight diffusers pipelines (CPU)."""

import warnings

import pytest
import torch

from tomesd_ext.core import NO_CFG_WARNING, ImportancePolicy, ToMeOptions
from tomesd_ext.core import detect_cfg_layout as detect_layout
from tomesd_ext.core.importance import importance_map
from tomesd_ext.diffusers import apply_tome, remove_tome
from tomesd_ext.diffusers.importance import ImportanceHooks
from tomesd_ext.diffusers.tome import PATCH_ATTR
from tomesd_ext.models import build_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("tiny", seed=0)


def run(pipe, prompt="a photo of a cat", steps=3, guidance=7.5, seed=0, size=(64, 64), **kwargs):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=h,
        width=w,
        output_type="latent",
        generator=g,
        **kwargs,
    ).images


def tracker_of(pipe) -> ImportancePolicy:
    return pipe.unet.__dict__[PATCH_ATTR].policy


def layout_of(unet):
    return unet.__dict__[PATCH_ATTR].importance.layout


def importance_warnings(record):
    return [w for w in record if "importance mode" in str(w.message)]


def n_merged_blocks(pipe):
    """Block calls per denoiser call that merge (the highest-resolution attention level)."""
    return len(pipe.unet.down_blocks[0].attentions) + len(pipe.unet.up_blocks[-1].attentions)


def test_txt2img_cfg_uses_the_map_from_step_one(pipe):
    apply_tome(pipe, 0.5, mode="importance", seed=0)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            a = run(pipe)
        assert not importance_warnings(record)
        tr = tracker_of(pipe)
        assert layout_of(pipe.unet) == "halves"
        assert tr.hmap.shape == (1, 8, 8)
        per_step = n_merged_blocks(pipe)
        # step 0 has no map (ToMe windows), steps 1 and 2 draw from the map
        assert tr.counts == {"tome": per_step, "importance": 2 * per_step}
        assert torch.isfinite(a).all()
        b = run(pipe)  # deterministic: same seed, same process -> identical
        assert torch.equal(a, b)
        apply_tome(pipe, 0.5, mode="tome", seed=0)
        assert not torch.equal(a, run(pipe))  # the importance policy really changed the plan
    finally:
        remove_tome(pipe)


def test_several_prompts_negative_prompts_odd_latent(pipe):
    apply_tome(pipe, 0.7, mode="importance", seed=1)
    seen = []
    tr = tracker_of(pipe)
    original = tr.plan

    def recording(metric, h, w, seed):
        plan = original(metric, h, w, seed)
        if tr.active is not None:
            seen.append((plan, tr.parts[(h, w)]))
        return plan

    tr.plan = recording
    try:
        out = run(
            pipe,
            prompt=["a red car", "a green tree"],
            negative_prompt=["blurry", "dark"],
            num_images_per_prompt=2,
            size=(72, 56),
            steps=2,
        )
        assert out.shape == (4, 4, 9, 7)
        assert tr.hmap.shape == (4, 9, 7)
        assert seen
        for plan, parts in seen:
            assert len(parts) == 4 and plan.batch == 8
            for row in range(8):  # rows j (uncond) and j + 4 (cond) share image j's partition
                dst = parts[row % 4].dst
                assert plan.group[row, dst].equal(torch.arange(dst.numel()))
    finally:
        remove_tome(pipe)


def test_no_cfg_falls_back_to_tome_with_one_warning(pipe):
    apply_tome(pipe, 0.5, mode="tome", seed=3)
    tome = run(pipe, guidance=1.0, steps=2)
    apply_tome(pipe, 0.5, mode="importance", seed=3)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            first = run(pipe, guidance=1.0, steps=2)
            second = run(pipe, guidance=1.0, steps=2)
        found = importance_warnings(record)
        assert len(found) == 1 and str(found[0].message) == NO_CFG_WARNING
        assert tracker_of(pipe).counts["importance"] == 0
        assert torch.equal(first, tome) and torch.equal(second, tome)
        apply_tome(pipe, 0.5, mode="importance", seed=3, cfg_layout="off")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            off = run(pipe, guidance=1.0, steps=2)
        assert not importance_warnings(record)
        assert torch.equal(off, tome)
    finally:
        remove_tome(pipe)


def test_remove_restores_bit_identical_output(pipe):
    base = run(pipe, steps=2)
    apply_tome(pipe, 0.5, mode="importance", seed=0)
    run(pipe, steps=2)
    remove_tome(pipe)
    assert torch.equal(run(pipe, steps=2), base)


def test_detect_layout():
    x = torch.randn(2, 4, 3, 3)
    assert detect_layout(torch.cat([x, x])) == "halves"
    assert detect_layout(x.repeat_interleave(2, 0)) == "interleaved"
    assert detect_layout(torch.randn(4, 4, 3, 3)) is None
    assert detect_layout(torch.randn(3, 4, 3, 3)) is None  # odd batch (e.g. guidance 1, 3 images)
    y = torch.randn(1, 4, 3, 3)
    assert detect_layout(torch.cat([y, y])) == "halves"  # one image: both layouts coincide
    assert detect_layout(torch.cat([y, y, y])) is None  # InstructPix2Pix-style 3-way batch
    assert detect_layout(torch.randn(4, 4, 3, 3), "interleaved") == "interleaved"  # forced
    assert detect_layout(torch.cat([x, x]), "off") is None


def test_interleaved_batch_on_the_unet_and_a_new_run(pipe):
    unet = pipe.unet
    apply_tome(unet, 0.5, mode="importance", seed=0)
    try:
        tr = unet.__dict__[PATCH_ATTR].policy
        torch.manual_seed(0)
        sample = torch.randn(2, 4, 8, 8).repeat_interleave(2, 0)  # u0 c0 u1 c1
        text = torch.randn(4, 77, unet.config.cross_attention_dim)
        with torch.no_grad():
            out = unet(sample, 900, encoder_hidden_states=text).sample
            assert layout_of(unet) == "interleaved"
            torch.testing.assert_close(tr.hmap, importance_map(out, "interleaved"))
            assert tr.counts["importance"] == 0
            unet(sample, 800, encoder_hidden_states=text)
            used = tr.counts["importance"]
            assert used > 0
            unet(sample, 950, encoder_hidden_states=text)  # timestep went up: a new run
            assert tr.counts["importance"] == used
    finally:
        remove_tome(unet)


def test_tracker_slices_learned_sigma_output():
    opts = ToMeOptions.create(mode="importance", seed=0)
    tr = ImportancePolicy(opts)
    hooks = ImportanceHooks(tr)
    sample = torch.randn(1, 3, 4, 4).repeat(2, 1, 1, 1)
    hooks.read(sample, 500)
    hooks.before(sample, 500)
    out = torch.randn(2, 6, 4, 4)  # (prediction, variance) channels
    hooks.post_hook(None, (sample,), out)
    torch.testing.assert_close(tr.hmap, (out[1, :3] - out[0, :3]).abs().mean(0, keepdim=True))


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl"])
def test_v_prediction_and_sdxl(name):
    p = build_pipeline(name, seed=0)
    apply_tome(p, 0.5, mode="importance", seed=0)
    out = run(p, steps=2)
    tr = tracker_of(p)
    assert tr.counts["importance"] > 0 and layout_of(p.unet) == "halves"
    assert torch.isfinite(out).all()


def test_prune_phase_covers_the_first_calls_of_each_run(pipe):
    apply_tome(pipe, 0.5, mode="importance", seed=0)
    merged = run(pipe)
    apply_tome(pipe, 0.5, mode="importance", seed=0, prune_steps=2)
    tr = tracker_of(pipe)
    original = tr.plan
    seen = []

    def recording(metric, h, w, seed):
        plan = original(metric, h, w, seed)
        seen.append((tr.step_index, plan.weight is not None))
        return plan

    tr.plan = recording
    try:
        for _ in range(2):  # the phase restarts with every run
            pruned = run(pipe)
        steps = sorted(set(seen))
        assert steps == [(0, True), (1, True), (2, False)]
        assert not torch.equal(pruned, merged)
        assert torch.isfinite(pruned).all()
    finally:
        remove_tome(pipe)
