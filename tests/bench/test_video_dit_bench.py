"""`tomesd-ext bench` on video transformers: argument checks before any model is built, the
tiny video models end to end (all methods, the temporal figure, ratios at equal error), the
video inputs and the two figures' arithmetic."""

import json

import pytest
import torch

from tomesd_ext import cli
from tomesd_ext.bench.equal_error import equal_error, ratio_at_error
from tomesd_ext.bench.metrics import frame_change
from tomesd_ext.bench.video_inputs import latent_frames, make_video_input
from tomesd_ext.models.video_configs import LTX_VAE, WAN_VAE

RUN = ["--repeats", "1", "--warmup", "0", "--no-progress"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "tiny-wan", "--frames", "16"], "--frames 16: must be 1 + a multiple of 4"),
        (["--model", "tiny-ltx", "--frames", "5"], "--frames 5: must be 1 + a multiple of 8"),
        (["--model", "tiny-wan", "--resolution", "256x500"], "--resolution 256x500: height and width must be multiples of 16"),
        (["--model", "tiny-ltx", "--resolution", "512x528"], "must be multiples of 32"),
        (["--model", "hunyuan-video"], "use 'hunyuan-video-depth4'"),
        (["--model", "tiny-flux", "--frames", "17"], "--frames 17: only for video transformers"),
        (["--model", "tiny-flux", "--methods", "tome-spatial"], "--methods tome-spatial: a video-transformer method"),
        (["--model", "tiny-sd3", "--resolution", "480x832"], "--resolution 480x832: HEIGHTxWIDTH is for video transformers"),
        (["--model", "tiny-wan", "--methods", "todo"], "--methods todo: a UNet method; --model tiny-wan is a video transformer"),
        (["--model", "tiny-wan", "--inputs", "photo"], "--inputs photo: choose from pan, gif, noise"),
        (["--model", "tiny-wan", "--equal-error", "tome-spatial"], "--equal-error 'tome-spatial': use METHOD:RATIO"),
        (["--model", "tiny-wan", "--equal-error", "tome-spatial:0.3"], "add tome-spatial to --methods and 0.3 to --ratios"),
        (["--model", "tiny-wan", "--methods", "compile", "--compile-backend", "nope"], "--compile-backend nope: choose from"),
    ],
)
def test_bad_video_arguments_exit_2_before_any_model(argv, message, capsys, monkeypatch):
    import tomesd_ext.bench.subject as subject

    monkeypatch.setattr(subject, "load_subject", lambda *a, **k: pytest.fail("built a model"))
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_video_points_video_transformers_to_bench(capsys):
    assert cli.main(["bench-video", "--model", "wan-1.3b"]) == 2
    assert "tomesd-ext bench --model wan-1.3b --frames" in capsys.readouterr().err


def test_tiny_wan_all_methods_temporal_figure_and_equal_error(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", "--model", "tiny-wan", *RUN, "--ratios", "0.3", "0.6", "--equal-error", "tome-spatial:0.6", "--json", str(out)]
    assert cli.main(argv) == 0  # default methods of a video transformer: tome, tome-spatial, tome-kv
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [("baseline", None)] + [(m, r) for m in ("tome", "tome-spatial", "tome-kv") for r in (0.3, 0.6)]
    assert all(r["resolution"] == "256x512" and r["frames"] == 17 and r["latent_frames"] == 5 and r["tokens"] == 2560 and r["batch"] == 2 for r in rows)
    assert rows[0]["temporal"] == 1.0 and rows[0]["rel_error"] == 0.0
    assert all(r["rel_error"] > 0 and r["temporal"] > 0 and r["temporal"] != 1.0 for r in rows[1:])
    spatial, st2 = (next(r for r in rows if r["method"] == m and r["ratio"] == 0.6) for m in ("tome-spatial", "tome"))
    assert spatial["rel_error"] != st2["rel_error"]  # st=1 and st=2 are different plans
    (entry,) = doc["equal_error"]
    assert entry["reference"] == "tome-spatial 0.6" and entry["ratios"]["tome-spatial"] == pytest.approx(0.6)
    assert doc["header"]["inputs"] == ["pan"] and "sharpened" in doc["header"]["weights"]
    text = capsys.readouterr().out
    assert "temporal" in text and "17 frames (2560 tokens)" in text and "ratio at the error of tome-spatial 0.6" in text
    assert "blocks[0]" in text


@pytest.mark.parametrize("name", ["tiny-ltx", "tiny-hunyuan-video"])
def test_tiny_ltx_and_hunyuan_end_to_end(name, tmp_path):
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--model", name, *RUN, "--methods", "tome-spatial", "--json", str(out)]) == 0
    base, merged = json.loads(out.read_text())["rows"]
    assert base["batch"] == (2 if name == "tiny-ltx" else 1)  # HunyuanVideo is guidance-distilled
    assert base["tokens"] == 2560 and merged["rel_error"] > 0 and merged["temporal"] > 0


def test_pan_clip_latents_are_redundant_across_frames():
    inp = make_video_input("pan", 2, 256, 512, 17, WAN_VAE, seed=0)
    assert inp.x0.shape == inp.noise.shape == (2, 16, 5, 32, 64) and torch.equal(inp.x0[0], inp.x0[1])
    x = inp.x0[:1]
    shuffled = x[:, :, torch.randperm(5, generator=torch.Generator().manual_seed(0))]
    noise = make_video_input("noise", 1, 256, 512, 17, WAN_VAE, seed=0)
    assert noise.x0 is None
    assert frame_change(x) < 0.5 * frame_change(noise.noise) and frame_change(x) <= frame_change(shuffled) + 1e-12
    ltx = make_video_input("gif", 1, 64, 96, 17, LTX_VAE, seed=0)
    assert ltx.x0.shape == (1, 128, 3, 2, 3) and latent_frames(161, 8) == 21


def test_frame_change_and_ratio_at_error_arithmetic():
    x = torch.zeros(1, 1, 3, 1, 1)
    x[0, 0, :, 0, 0] = torch.tensor([0.0, 1.0, 3.0])
    assert frame_change(x) == 1.5
    with pytest.raises(ValueError, match="F >= 2"):
        frame_change(torch.zeros(1, 1, 1, 2, 2))
    assert ratio_at_error([(0.3, 0.1), (0.5, 0.2), (0.7, 0.4)], 0.3) == pytest.approx(0.6)
    assert ratio_at_error([(0.3, 0.1), (0.5, 0.2)], 0.5) is None
    rows = [{"method": m, "ratio": r, "rel_error": e, "resolution": "a", "input": "pan"}
            for m, r, e in (("tome-spatial", 0.5, 0.2), ("tome-spatial", 0.3, 0.1), ("tome", 0.5, 0.15), ("tome", 0.7, 0.25))]
    (entry,) = equal_error(rows, "tome-spatial", 0.5)
    assert entry["ratios"] == {"tome-spatial": pytest.approx(0.5), "tome": pytest.approx(0.6)}
