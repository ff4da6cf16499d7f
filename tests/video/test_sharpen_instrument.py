"""The sharpened-attention instrument of the video bench: options, loading, jobs field, and that
VidToMe makes the noise prediction of consistent frames more alike only when attention is peaked."""

import pytest
import torch

from tomesd_ext.core.options import OptionError
from tomesd_ext.bench.video.probe import one_chunk_eps_change, shared_noise_latents
from tomesd_ext.video import VideoEditor, frame_difference, moving_shapes
from tomesd_ext.video.jobs import JobError, parse_job
from tomesd_ext.video.models import DEFAULT_SHARPEN, load_pipeline, model_id, resolve_sharpen


def test_resolve_sharpen_auto_and_explicit(tmp_path):
    assert resolve_sharpen("tiny") == DEFAULT_SHARPEN == 2.0
    assert resolve_sharpen("sd15", None) == 2.0
    assert resolve_sharpen(str(tmp_path)) == 0.0  # a local checkpoint: real weights, left alone
    assert resolve_sharpen("tiny", "0") == 0.0
    assert resolve_sharpen(str(tmp_path), 3) == 3.0
    for bad in (-1, "x", True, 100):
        with pytest.raises(OptionError, match="sharpen"):
            resolve_sharpen("tiny", bad)
    assert model_id("tiny", 0.0) == "tiny" and model_id("tiny", 2.0) != "tiny"


def test_load_pipeline_sharpens_self_attention_only():
    plain = load_pipeline("tiny")
    sharp = load_pipeline("tiny", sharpen=2.0)
    names = [n for n, _ in sharp.unet.named_modules() if n.endswith(("attn1", "attn2"))]
    assert any(n.endswith("attn1") for n in names)
    for name in names:
        attn, ref = sharp.unet.get_submodule(name), plain.unet.get_submodule(name)
        assert torch.equal(attn.to_v.weight, ref.to_v.weight)
        if name.endswith("attn1"):
            assert torch.equal(attn.to_q.weight, 2.0 * ref.to_q.weight)
            assert torch.equal(attn.to_k.weight, attn.to_q.weight)
        else:  # cross-attention untouched
            assert torch.equal(attn.to_k.weight, ref.to_k.weight)


def test_job_sharpen_field(tmp_path):
    base = {"input": "in.gif", "output": "out", "edit_prompt": "a cat", "source_prompt": "a clip"}
    assert parse_job(0, base, tmp_path).spec["sharpen"] == 2.0  # auto, built-in model
    assert parse_job(0, {**base, "sharpen": 0}, tmp_path).spec["sharpen"] == 0.0
    assert parse_job(0, {**base, "model": str(tmp_path)}, tmp_path).spec["sharpen"] == 0.0
    with pytest.raises(JobError, match="sharpen"):
        parse_job(0, {**base, "sharpen": "much"}, tmp_path)


def test_frame_difference():
    x = torch.ones(3, 2, 4, 4)
    assert frame_difference(x) == 0.0
    x[1] = -1  # every consecutive pair differs by 2 everywhere: 4 / 1
    assert frame_difference(x) == pytest.approx(4.0)
    assert frame_difference(x[:1]) != frame_difference(x[:1])  # NaN for one frame


def _eps_frame_difference(pipe, vidtome: bool, seed: int) -> float:
    """Guided noise prediction of 4 consistent frames (moving shapes, one shared noise) in one call."""
    ed = VideoEditor(pipe)
    x = shared_noise_latents(ed.scheduler, ed.encode(moving_shapes(4, 64, seed=seed)), 251, seed)
    emb = ed.embed("a watercolor painting", "ugly")
    return one_chunk_eps_change(ed, x, torch.tensor(251), emb, vidtome_seed=seed if vidtome else None)


def test_vidtome_makes_frames_agree_only_with_peaked_attention():
    """Plain random weights: attention ~uniform, VidToMe leaves the frame-to-frame change of the
    noise prediction where it was (ratio ~1.0-1.03 measured); sharpened x4 (normalised entropy
    ~0.25 on tiny): matched tokens share attention outputs and the change drops (ratio ~0.47-0.62)."""
    plain, sharp = load_pipeline("tiny"), load_pipeline("tiny", sharpen=4.0)
    for seed in (0, 1):
        assert _eps_frame_difference(plain, True, seed) / _eps_frame_difference(plain, False, seed) > 0.9
        assert _eps_frame_difference(sharp, True, seed) / _eps_frame_difference(sharp, False, seed) < 0.75
