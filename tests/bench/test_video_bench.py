"""`tomesd-ext bench-video` end to end on the tiny model: the JSON fields docs/video.md documents."""

import json

import pytest

from tomesd_ext import cli

METHOD_FIELDS = ("warp_error", "s_per_frame", "s_per_frame_all", "peak_rss_mb", "eps_frame_diff", "eps_frame_diff_mean",
                 "merged_attention_calls")


def test_bench_video_tiny_json(tmp_path, capsys):
    out = tmp_path / "v.json"
    argv = ["bench-video", "--clips", "shapes", "--frames", "4", "--size", "64", "--steps", "2", "--repeats", "2",
            "--memory-frames", "4", "--json", str(out), "--plot", str(tmp_path / "v.png")]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["model"] == "tiny" and doc["sharpen"] == 2.0 and doc["steps"] == 2
    (row,) = doc["clips"]
    assert row["frames"] == 4 and set(row["methods"]) == {"per-frame", "vidtome"}
    for m in row["methods"].values():
        assert all(k in m for k in METHOD_FIELDS)
        assert len(m["s_per_frame_all"]) == 2 and len(m["eps_frame_diff"]) == 2  # repeats, steps
        assert m["warp_error"] >= 0 and m["peak_rss_mb"] >= 0
    assert row["methods"]["per-frame"]["merged_attention_calls"] == {}
    assert sum(row["methods"]["vidtome"]["merged_attention_calls"].values()) > 0
    probe = row["probe"]
    assert probe["timestep"] == 251 and probe["ratio_vidtome_over_perframe"] == probe["vidtome"] / probe["per-frame"]
    assert [(r["frames"], r["method"]) for r in doc["memory"]] == [(4, "per-frame"), (4, "vidtome")]
    assert all(r["peak_rss_mb"] >= 0 and r["steps"] == 1 for r in doc["memory"])
    assert (tmp_path / "v.png").stat().st_size > 0
    assert "vidtome/per-frame" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--clips", "{t}/missing.mp4"], "--clips"),
        (["--clips", "{t}/fake.mp4"], "cannot open video"),
        (["--clips", ""], "--clips"),
        (["--frames", "0"], "--frames 0"),
        (["--steps", "0"], "--steps 0"),
        (["--seed", "-1"], "--seed -1"),
        (["--model", "sd99"], "--model 'sd99'"),
        (["--model", "tiny-sdxl"], "--model 'tiny-sdxl'"),
        (["--size", "7"], "--size 7"),
        (["--size", "100"], "--size 100"),
        (["--chunk-size", "0"], "--chunk-size 0"),
        (["--repeats", "0"], "--repeats 0"),
        (["--memory-frames", "4,x"], "--memory-frames"),
        (["--memory-steps", "9"], "--memory-steps 9"),
        (["--probe-t", "1000"], "--probe-t 1000"),
        (["--sharpen", "loud"], "sharpen"),
        (["--json", "{t}"], "--json"),
        (["--plot", "{t}"], "--plot"),
    ],
)
def test_bad_input_fails_before_any_model_loads(tmp_path, capsys, monkeypatch, argv, message):
    import tomesd_ext.video.models as models

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "fake.mp4").write_text("not a video")
    assert cli.main(["bench-video", *[a.format(t=tmp_path) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert "tomesd-ext bench-video: error:" in err and message in err and "Traceback" not in err
