"""`tomesd-ext bench` on AnimateDiff UNets: argument checks before any model is built, and the tiny
AnimateDiff UNet end to end (shared and per-frame plans, the temporal figure)."""

import json

import pytest

from tomesd_ext import cli

RUN = ["--repeats", "1", "--warmup", "0", "--no-progress"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "tiny-animatediff", "--frames", "40"], "--frames 40: AnimateDiff clips have 2 to 32 frames"),
        (["--model", "tiny-animatediff", "--frames", "1"], "--frames 1: AnimateDiff clips have 2 to 32 frames"),
        (["--model", "tiny-animatediff", "--resolution", "100"], "--resolution 100x100: height and width must be multiples of 8"),
        (["--model", "tiny-animatediff", "--micro"], "--micro: the operator micro-bench reads image UNet levels; not for AnimateDiff UNets"),
        (["--model", "tiny-animatediff", "--methods", "tome-spatial"],
         "--methods tome-spatial: a video-transformer method; --model tiny-animatediff is an AnimateDiff UNet"),
        (["--model", "tiny", "--methods", "tome-per-frame"], "--methods tome-per-frame: an AnimateDiff method; --model tiny is a UNet"),
        (["--model", "tiny-animatediff", "--inputs", "photo"], "--inputs photo: choose from pan, gif, noise (an AnimateDiff UNet)"),
    ],
)
def test_bad_animatediff_arguments_exit_2_before_any_model(argv, message, capsys, monkeypatch):
    import tomesd_ext.bench.subject as subject

    monkeypatch.setattr(subject, "load_subject", lambda *a, **k: pytest.fail("built a model"))
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, frames", [("tiny-animatediff", 8), ("tiny-sdxl-animatediff", 4)])
def test_tiny_animatediff_shared_and_per_frame(name, frames, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tomesd_ext.core.options.MIN_TOKENS_DEFAULT", 0)  # 8x8 frames: merge them anyway
    out = tmp_path / "r.json"
    argv = ["bench", "--model", name, "--frames", str(frames), "--resolution", "64", *RUN, "--ratios", "0.5",
            "--json", str(out)]
    assert cli.main(argv) == 0  # default methods of an AnimateDiff UNet: tome, tome-per-frame
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [("baseline", None), ("tome", 0.5), ("tome-per-frame", 0.5)]
    assert all(r["resolution"] == "64x64" and r["frames"] == frames and r["latent_frames"] == frames
               and r["tokens"] == frames * 64 and r["batch"] == 2 for r in rows)
    assert rows[0]["temporal"] == 1.0 and rows[0]["rel_error"] == 0.0
    assert all(r["rel_error"] > 0 and r["temporal"] > 0 and r["temporal"] != 1.0 for r in rows[1:])
    assert rows[1]["rel_error"] != rows[2]["rel_error"]  # one plan per clip vs one per frame
    text = capsys.readouterr().out
    assert f"{frames} frames ({frames * 64} tokens)" in text and "temporal" in text


@pytest.mark.parametrize("model, extra", [("tiny-animatediff", ["--frames", "4"]), ("tiny", [])])
def test_block_and_ops_methods_on_unets_with_the_cpu_clock(model, extra, tmp_path, monkeypatch):
    """tome-block (unet_mode="block") and tome-ops side by side on a UNet and an AnimateDiff UNet,
    timed with --clock cpu (recorded in the header)."""
    monkeypatch.setattr("tomesd_ext.core.options.MIN_TOKENS_DEFAULT", 0)
    out = tmp_path / "r.json"
    argv = ["bench", "--model", model, *extra, "--resolution", "64", *RUN, "--ratios", "0.5", "--clock", "cpu",
            "--methods", "tome-ops,tome-block", "--json", str(out)]
    if model == "tiny":
        argv += ["--inputs", "noise"]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert doc["header"]["clock"] == "cpu"
    assert [r["method"] for r in rows] == ["baseline", "tome-ops", "tome-block"]
    assert all(r["seconds_median"] > 0 for r in rows)
    assert 0 < rows[1]["rel_error"] != rows[2]["rel_error"] > 0  # another mode, another output


def test_d2_method_on_an_animatediff_unet(tmp_path, monkeypatch):
    """tome-d2 takes AnimateDiff UNets: the next level merges too, so the output moves further
    from the unmerged one than the default's (which merges the top level only)."""
    monkeypatch.setattr("tomesd_ext.core.options.MIN_TOKENS_DEFAULT", 0)
    out = tmp_path / "r.json"
    argv = ["bench", "--model", "tiny-animatediff", "--frames", "4", "--resolution", "64", *RUN, "--ratios", "0.5",
            "--methods", "tome,tome-d2", "--json", str(out)]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["baseline", "tome", "tome-d2"]
    assert 0 < rows[1]["rel_error"] < rows[2]["rel_error"]
