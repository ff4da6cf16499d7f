"""edit-video with video transformers: the built-in wan-tiny and ltx-tiny end to end (sdedit and
flowedit, merged and unmerged, outputs at the input's size and length, resume), tome ratio 0
bit-identical to unmerged, and bad fields refused with messages naming them."""

import json

import cv2
import numpy as np
import pytest
import yaml

from tomesd_ext import cli
from tomesd_ext.video import moving_shapes, write_mp4
from tomesd_ext.video.jobs import JobError, parse_job

# 6 frames of 72 x 100: not a multiple of the models' 16 / 32, not 4k + 1 / 8k + 1 frames
DEFAULTS = {"steps": 3, "source_prompt": "shapes", "edit_prompt": "a cat", "cache_dir": "cache"}
MERGE = {"ratio": 0.5, "min_tokens": 0}  # the tiny clips are far under the default min_tokens
JOBS = [
    {"name": "wan-sde", "model": "wan-tiny", "strength": 0.6, "tome": False},
    {"name": "wan-sde-merged", "model": "wan-tiny", "strength": 0.6, "tome": MERGE},
    {"name": "wan-sde-ratio0", "model": "wan-tiny", "strength": 0.6, "tome": {"ratio": 0.0, "min_tokens": 0}},
    {"name": "wan-fe-merged", "model": "wan-tiny", "mode": "flowedit", "n_max": 2, "tome": MERGE},
    {"name": "ltx-sde", "model": "ltx-tiny"},
    {"name": "ltx-fe", "model": "ltx-tiny", "mode": "flowedit", "n_avg": 2, "n_min": 1, "tome": False},
    {"name": "ltx-fe-merged", "model": "ltx-tiny", "mode": "flowedit", "n_avg": 2, "n_min": 1, "tome": MERGE},
]


def _frames(folder):
    return [cv2.imread(str(p))[..., ::-1] for p in sorted((folder / "frames").glob("*.png"))]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowjobs")
    write_mp4([f[:72, :100] for f in moving_shapes(6, 128)], root / "clip.mp4", 8)
    jobs = [{"input": "clip.mp4", "output": f"out/{j['name']}", **j} for j in JOBS]
    f = root / "jobs.yaml"
    f.write_text(yaml.safe_dump({"defaults": DEFAULTS, "jobs": jobs}))
    rc = cli.main(["edit-video", str(f), "--no-progress", "--json", str(root / "s1.json")])
    return root, f, rc


def test_every_job_runs_and_keeps_the_input_length_and_size(batch):
    root, _, rc = batch
    summary = {r["name"]: r for r in json.loads((root / "s1.json").read_text())}
    assert rc == 0, summary
    for job in JOBS:
        r = summary[job["name"]]
        assert r["status"] == "done" and r["frames"] == 6 and r["size"] == "100x72", r
        assert "no inversion cache needed" in r["message"]
        patched = isinstance(job.get("tome"), dict)  # min_tokens 0; the default (ltx-sde) is under min_tokens
        assert ("; merged" in r["message"]) == patched, r["message"]
        if "tome" not in job:
            assert "not merged (under min_tokens)" in r["message"]
        frames = _frames(root / "out" / job["name"])
        assert len(frames) == 6 and frames[0].shape == (72, 100, 3)
        assert np.isfinite(r["warp_error"])
        record = json.loads((root / "out" / job["name"] / "job.json").read_text())
        assert record["name"] == job["name"]
    assert not list((root / "cache").glob("*")) if (root / "cache").exists() else True  # nothing cached


def test_merging_changes_the_edit_and_ratio_zero_is_the_unmerged_edit(batch):
    root, _, _ = batch
    out = {j["name"]: np.stack(_frames(root / "out" / j["name"])) for j in JOBS}
    assert np.array_equal(out["wan-sde"], out["wan-sde-ratio0"])
    assert not np.array_equal(out["wan-sde"], out["wan-sde-merged"])
    assert not np.array_equal(out["ltx-fe"], out["ltx-fe-merged"])
    assert not np.array_equal(out["wan-sde"], out["wan-fe-merged"])


def test_rerun_skips_every_job_and_changes_nothing(batch):
    root, f, _ = batch
    before = {p: p.stat().st_mtime_ns for p in (root / "out").rglob("*")}
    rc = cli.main(["edit-video", str(f), "--no-progress", "--json", str(root / "s2.json")])
    summary = json.loads((root / "s2.json").read_text())
    assert rc == 0 and [r["status"] for r in summary] == ["skipped"] * len(JOBS)
    assert {p: p.stat().st_mtime_ns for p in (root / "out").rglob("*")} == before


BASE = {"input": "clip.mp4", "output": "out/x", "edit_prompt": "a cat", "source_prompt": "shapes"}


@pytest.mark.parametrize("fields, message", [
    ({"model": "wan-tiny", "mode": "invert"}, "mode='invert' is not allowed for a video-transformer model"),
    ({"model": "ltx-tiny", "vidtome": {"local_ratio": 0.5}}, "field(s) ['vidtome'] apply to Stable Diffusion models"),
    ({"model": "wan-tiny", "control": "canny"}, "field(s) ['control'] apply to Stable Diffusion models"),
    ({"model": "wan-tiny", "chunk_size": 2}, "field(s) ['chunk_size'] apply to Stable Diffusion models"),
    ({"model": "tiny", "tome": {"ratio": 0.5}}, "field(s) ['tome'] apply to video-transformer models"),
    ({"model": "tiny", "n_max": 3}, "field(s) ['n_max'] apply to video-transformer models"),
    ({"model": "wan-tiny", "mode": "flowedit", "steps": 4, "n_max": 5}, "n_max=5 is out of range: allowed [1, 4]"),
    ({"model": "wan-tiny", "mode": "flowedit", "steps": 4, "n_max": 2, "n_min": 2}, "n_min=2 is out of range"),
    ({"model": "wan-tiny", "mode": "flowedit", "n_avg": 0}, "n_avg=0 is out of range"),
    ({"model": "wan-tiny", "source_guidance": -1}, "source_guidance=-1 is out of range"),
    ({"model": "wan-tiny", "strength": 0}, "strength=0 is out of range"),
    ({"model": "wan-tiny", "tome": {"ratio": 1.5}}, "ratio"),
    ({"model": "wan-tiny", "tome": {"speed": 2}}, "tome: unknown option(s) ['speed']"),
    ({"model": "wan-tiny", "tome": "fast"}, "tome must be false or a mapping"),
    ({"model": "wan-tiny", "sharpen": 2}, "sharpening applies to Stable Diffusion UNets"),
])
def test_bad_fields_are_refused_naming_them(tmp_path, fields, message):
    with pytest.raises(JobError, match="^job 1: .*" + message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        parse_job(0, {**BASE, **fields}, tmp_path)


def test_flowedit_needs_a_source_prompt(tmp_path):
    raw = {**BASE, "model": "wan-tiny", "mode": "flowedit"}
    del raw["source_prompt"]
    with pytest.raises(JobError, match=r"missing required field\(s\) \['source_prompt'\]"):
        parse_job(0, raw, tmp_path)
    del raw["mode"]  # sdedit, the default of a video transformer, needs none
    assert parse_job(0, raw, tmp_path).settings.mode == "sdedit"


def test_a_clip_longer_than_the_native_length_fails_naming_the_limit(tmp_path):
    write_mp4(moving_shapes(82, 16), tmp_path / "long.mp4", 8)
    f = tmp_path / "jobs.yaml"
    f.write_text(yaml.safe_dump({"jobs": [{**BASE, "input": "long.mp4", "model": "wan-tiny"}]}))
    rc = cli.main(["edit-video", str(f), "--no-progress", "--json", str(tmp_path / "s.json")])
    (r,) = json.loads((tmp_path / "s.json").read_text())
    assert rc == 1 and r["status"] == "failed"
    assert "82 frames" in r["message"] and "at most 81" in r["message"] and "frames: {max: 81}" in r["message"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_wan22_two_experts_split_the_steps_at_the_boundary():
    """A Wan 2.2 A14B-shaped pipeline: transformer above boundary_ratio, transformer_2 below; an
    edit with merging runs both experts and leaves neither patched."""
    import torch
    from diffusers import WanPipeline

    from tomesd_ext.models.video_pipeline import build_video_pipeline
    from tomesd_ext.video.flow_editor import FlowEditSettings, FlowVideoEditor

    base = build_video_pipeline("wan-tiny")
    second = build_video_pipeline("wan-tiny", seed=9).transformer
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
                       transformer=base.transformer, transformer_2=second, boundary_ratio=0.8)
    pipe.text_tokens = base.text_tokens
    editor = FlowVideoEditor(pipe)
    assert editor._model(0.9) is base.transformer and editor._model(0.8) is base.transformer
    assert editor._model(0.79) is second
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    emb = editor.embed("a cat", "")
    before = [editor.velocity(emb, 5.0, 16)(x, s) for s in (0.9, 0.5)]
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, o, name=name: seen.append(name))
             for name, m in (("high", base.transformer), ("low", second))]
    try:
        frames = moving_shapes(5, 32)
        out = editor.edit(frames, "", "a cat", FlowEditSettings(steps=4, strength=1.0, tome={"min_tokens": 0}))
    finally:
        for h in hooks:
            h.remove()
    assert len(out) == 5 and out[0].shape == (32, 32, 3)
    assert seen.count("high") == 2 and seen.count("low") == 2  # sigmas 1, 0.9 | 0.75, 0.5 (shift 3)
    after = [editor.velocity(emb, 5.0, 16)(x, s) for s in (0.9, 0.5)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # both experts unpatched again


def test_a_video_transformer_single_file_is_refused_with_a_hint(tmp_path):
    import torch
    from safetensors.torch import save_file

    from tomesd_ext.video.models import load_pipeline

    path = tmp_path / "wan.safetensors"  # a Wan transformer's original key layout
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a Stable Diffusion single-file checkpoint.*diffusers folder"):
        load_pipeline(str(path))


def test_a_local_wan_diffusers_folder_is_a_video_transformer_model(tmp_path):
    from tomesd_ext.models.video_pipeline import build_video_pipeline
    from tomesd_ext.video.models import backend_of

    build_video_pipeline("wan-tiny").save_pretrained(str(tmp_path / "wan"))
    assert backend_of(str(tmp_path / "wan")) == "flow" and backend_of("tiny") == "sd"
    write_mp4(moving_shapes(3, 32), tmp_path / "clip.mp4", 8)
    f = tmp_path / "jobs.yaml"
    f.write_text(yaml.safe_dump({"jobs": [{**BASE, "model": str(tmp_path / "wan"), "steps": 2, "mode": "flowedit", "n_max": 1}]}))
    rc = cli.main(["edit-video", str(f), "--no-progress", "--json", str(tmp_path / "s.json")])
    (r,) = json.loads((tmp_path / "s.json").read_text())
    assert rc == 0 and r["status"] == "done" and r["frames"] == 3 and "flowedit: no inversion cache needed" in r["message"]
