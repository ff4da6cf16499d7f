"""The editing pipeline and the edit-video batch command on the tiny model."""

import argparse
import json

import pytest
import torch
import yaml

from tomesd_ext.commands import edit_video
from tomesd_ext.video import EditSettings, VideoEditor, moving_shapes, write_mp4
from tomesd_ext.video.models import load_pipeline


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def test_unet_calls_bounded_by_chunk_and_cover_all_frames(pipe, tmp_path):
    """A long video never goes through attention at once: every UNet call holds <= S*chunk frames."""
    editor = VideoEditor(pipe, cache_dir=str(tmp_path))
    batches = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a, k: batches.append(a[0].shape[0] if a else k["sample"].shape[0]), with_kwargs=True)
    try:
        frames = moving_shapes(10, 32)
        timings = {}
        out = editor.edit(frames, "shapes", "a cat", EditSettings(steps=2, chunk_size=3, seed=1), cache_key="k", timings=timings)
    finally:
        h.remove()
    assert len(out) == 10 and out[0].shape == (32, 32, 3)
    assert max(batches) <= 2 * 3
    gen = batches[len(batches) // 2 :]  # inversion (S=1) first, then generation (S=2)
    assert sum(gen) == 2 * 10 * 2  # each step covers all 10 frames exactly once, for 2 samples
    assert set(timings) >= {"invert", "generate", "total"}
    # the inversion is cached: a second edit prompt reuses it
    editor.edit(frames, "shapes", "a dog", EditSettings(steps=2, chunk_size=3, seed=1), cache_key="k")
    assert editor.last_cache_hit


def test_vidtome_deterministic_and_different_from_per_frame(pipe):
    editor = VideoEditor(pipe)
    frames = moving_shapes(4, 32)
    s = dict(mode="sdedit", steps=2, strength=1.0, seed=3)
    a = editor.edit(frames, "", "a cat", EditSettings(**s))
    b = editor.edit(frames, "", "a cat", EditSettings(**s))
    c = editor.edit(frames, "", "a cat", EditSettings(**s, vidtome=None))
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))
    assert not any("VidToMe" in type(m.processor).__name__ for n, m in pipe.unet.named_modules() if n.endswith("attn1"))


def _run_cli(jobs_file, *extra):
    parser = argparse.ArgumentParser()
    edit_video.add_parser(parser.add_subparsers())
    args = parser.parse_args(["edit-video", str(jobs_file), "--no-progress", *extra])
    return args.run(args)


def test_batch_jobs_errors_atomic_outputs_and_rerun(tmp_path, capsys):
    write_mp4(moving_shapes(4, 32), tmp_path / "clip.mp4", 8)
    (tmp_path / "corrupt.gif").write_bytes(b"GIF89a broken")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should go")
    jobs = {
        "defaults": {"model": "tiny", "steps": 1, "size": 32, "cache_dir": "cache", "source_prompt": "shapes"},
        "jobs": [
            {"name": "ok", "input": "clip.mp4", "output": "out/ok", "edit_prompt": "a cat", "control": "canny"},
            {"name": "corrupt", "input": "corrupt.gif", "output": "out/c", "edit_prompt": "x"},
            {"name": "nofield", "input": "clip.mp4", "output": "out/n"},
            {"name": "unwritable", "input": "clip.mp4", "output": "blocker/sub", "edit_prompt": "x"},
            {"name": "zero", "input": "clip.mp4", "output": "out/z", "edit_prompt": "x", "frames": {"start": 99}},
            {"name": "badopt", "input": "clip.mp4", "output": "out/b", "edit_prompt": "x", "vidtome": {"local_ratio": 2}},
            {"name": "sd", "input": "clip.mp4", "output": "out/sd", "edit_prompt": "x", "mode": "sdedit", "vidtome": False},
        ],
    }
    f = tmp_path / "jobs.yaml"
    f.write_text(yaml.safe_dump(jobs))
    rc = _run_cli(f, "--json", str(tmp_path / "summary.json"))
    out = capsys.readouterr().out
    assert rc == 1
    summary = {r["name"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert summary["ok"]["status"] == "done" and summary["sd"]["status"] == "done"
    assert summary["ok"]["warp_error"] >= 0
    assert "corrupt" in summary["corrupt"]["message"]
    assert "missing required field" in summary["nofield"]["message"] and "edit_prompt" in summary["nofield"]["message"]
    assert "not writable" in summary["unwritable"]["message"]
    assert "zero frames" in summary["zero"]["message"]
    assert "local_ratio" in summary["badopt"]["message"]
    assert "2 done" in out and "5 failed" in out
    done = tmp_path / "out" / "ok"
    assert (done / "output.mp4").stat().st_size > 0 and len(list((done / "frames").glob("*.png"))) == 4
    assert json.loads((done / "job.json").read_text())["frames"] == 4
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]
    # rerun: finished jobs are skipped, untouched
    mtime = (done / "job.json").stat().st_mtime_ns
    _run_cli(f, "--only", "ok", "--only", "sd")
    out = capsys.readouterr().out
    assert "skipped" in out and (done / "job.json").stat().st_mtime_ns == mtime


def test_bad_jobs_file(tmp_path, capsys):
    f = tmp_path / "jobs.yaml"
    f.write_text("jobs: {not: a list}")
    assert _run_cli(f) == 2
    assert "must hold a list" in capsys.readouterr().err
    assert _run_cli(tmp_path / "missing.yaml") == 2


def test_local_checkpoint_folder_loads(pipe, tmp_path):
    """A local diffusers folder (here: the tiny model saved with save_pretrained) is a valid model."""
    pipe.save_pretrained(tmp_path / "ckpt")
    local = load_pipeline(str(tmp_path / "ckpt"))
    assert type(local.scheduler).__name__ == "DDIMScheduler"
    a = VideoEditor(local).edit(moving_shapes(2, 32), "", "x", EditSettings(mode="sdedit", steps=1, strength=1.0))
    b = VideoEditor(pipe).edit(moving_shapes(2, 32), "", "x", EditSettings(mode="sdedit", steps=1, strength=1.0))
    assert all((x == y).all() for x, y in zip(a, b))
    with pytest.raises(ValueError, match="neither a local path"):
        load_pipeline("no-such-model")


def test_vidtome_merges_every_self_attention_of_both_default_levels(pipe):
    """No level is skipped (no min_tokens rule in VidToMe): at 64 px (8x8 latent) the 64- and
    16-token levels (d = 1, 2) are merged in every chunk call of every step, and nothing else."""
    from tomesd_ext.core import chunk_frames

    editor = VideoEditor(pipe)
    lat = editor.encode(moving_shapes(6, 64))
    editor.scheduler.set_timesteps(3)
    s = EditSettings(steps=3, seed=2, chunk_size=4)
    editor.generate(lat, editor.scheduler.timesteps, "a cat", s)
    calls = editor.last_merged_calls
    assert set(calls) == {64, 16}
    n_chunk_calls = sum(len(chunk_frames(6, 4, 2, i)) for i in range(3))
    n_single = sum(1 for i in range(3) for c in chunk_frames(6, 4, 2, i) if len(c) == 1)
    assert n_chunk_calls > n_single  # some chunks hold several frames, so merging happened
    for n, k in calls.items():
        assert k % n_chunk_calls == 0 and k > 0
    editor.generate(lat, editor.scheduler.timesteps, "a cat", EditSettings(steps=3, seed=2, vidtome=None))
    assert editor.last_merged_calls == {}
