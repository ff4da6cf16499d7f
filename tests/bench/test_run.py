"""A tiny end-to-end bench: JSON schema, atomic rewrites, plot/images, and model loading."""

import json

import pytest
import torch

from tomesd_ext import cli
from tomesd_ext.bench.report import ROW_FIELDS

HEADER_FIELDS = ("torch", "diffusers", "device", "dtype", "attention_backend", "commit", "command", "date")
TINY = ["--model", "tiny", "--resolution", "384", "--ratios", "0.5", "--repeats", "1", "--warmup", "0", "--no-progress"]


def test_tiny_run_json_schema_plot_and_images(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", *TINY, "--methods", "tome,todo", "--json", str(out), "--plot", str(tmp_path / "p.png"), "--images", str(tmp_path / "img")]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert all(k in doc["header"] for k in HEADER_FIELDS)
    rows = doc["rows"]
    assert {(r["method"], r["input"]) for r in rows} == {(m, i) for m in ("baseline", "tome", "todo") for i in ("photo", "noise")}
    for r in rows:
        assert all(k in r for k in ROW_FIELDS)
        assert r["resolution"] == 384 and r["batch"] == 2
        assert r["seconds_min"] <= r["seconds_median"] <= r["seconds_max"]
    base = [r for r in rows if r["method"] == "baseline"]
    assert all(r["speedup"] == 1.0 and r["rel_error"] == 0.0 and r["psnr"] is None and r["ssim"] == 1.0 for r in base)
    tome = [r for r in rows if r["method"] == "tome"]
    assert all(r["ratio"] == 0.5 and r["rel_error"] > 0 and r["psnr"] > 0 for r in tome)
    assert [r["ratio"] for r in rows if r["method"] == "todo"] == [None, None]
    assert (tmp_path / "p.png").stat().st_size > 0
    assert (tmp_path / "img" / "grid_384px.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "baseline" in table and "speedup" in table


def test_interrupted_run_leaves_valid_json(tmp_path):
    from tomesd_ext.bench.runner import BenchSettings, run_bench
    from tomesd_ext.bench.subject import load_subject

    out = tmp_path / "r.json"
    settings = BenchSettings(resolutions=[64], methods=["tome"], ratios=[0.5], repeats=1, warmup=0, inputs=["photo"])
    seen = []

    def stop(row):
        seen.append(row)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(load_subject("tiny"), settings, json_path=str(out), progress=False, after_row=stop)
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 1 and doc["rows"][0]["method"] == "baseline"
    assert not list(tmp_path.glob("*.tmp*"))


def test_steps_reports_final_latent_error(tmp_path):
    out = tmp_path / "r.json"
    argv = ["bench", *TINY, "--methods", "tome", "--steps", "2", "--inputs", "noise", "--repeats", "0", "--json", str(out)]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["rel_error_latent"] == 0.0 and rows[1]["rel_error_latent"] > 0


def test_local_diffusers_folder_loads(tmp_path):
    from tomesd_ext.bench.subject import load_subject
    from tomesd_ext.models import build_pipeline

    folder = tmp_path / "pipe"
    build_pipeline("tiny").save_pretrained(folder)
    subject = load_subject(str(folder))
    assert subject.real_weights and not subject.sharpened
    out = tmp_path / "r.json"
    argv = ["bench", "--model", str(folder), *TINY[2:], "--methods", "tome", "--inputs", "photo", "--json", str(out)]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["baseline", "tome"]
    assert json.loads(out.read_text())["header"]["weights"] == "real"


def test_single_file_checkpoint_loads_offline(tmp_path, monkeypatch):
    """A single-file .safetensors checkpoint loads without network (built-in configs written
    locally), with the checkpoint's own weights, and the bench runs on it."""
    from tomesd_ext.bench.subject import load_subject
    from tomesd_ext.models import build_unet
    from tomesd_ext.models.checkpoint import write_checkpoint
    from tomesd_ext.models.single_file import builtin_architecture

    monkeypatch.setenv("TOMESD_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_checkpoint(str(tmp_path / "tiny.safetensors"), "tiny", seed=3)
    assert builtin_architecture(path) == "tiny"
    with pytest.warns(UserWarning, match="built-in tiny configs"):
        subject = load_subject(path)
    assert subject.real_weights
    reference = build_unet("tiny", 3).state_dict()
    loaded = subject.denoiser.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(loaded[key], value.half().float(), rtol=0, atol=0)
    out = tmp_path / "r.json"
    argv = ["bench", "--model", path, *TINY[2:], "--methods", "tome", "--inputs", "photo", "--json", str(out)]
    assert cli.main(argv) == 0
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == ["baseline", "tome"]


def test_single_file_that_is_not_a_checkpoint_is_rejected(tmp_path):
    from safetensors.torch import save_file

    from tomesd_ext.models.single_file import builtin_architecture

    path = str(tmp_path / "other.safetensors")
    save_file({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a Stable Diffusion single-file checkpoint"):
        builtin_architecture(path)


def test_clamped_ratio_is_recorded_as_run_beside_the_requested_one(tmp_path, capsys):
    """--ratios 0.9 runs at the maximum 0.75 (one destination per 2x2 window): the row's ratio is
    0.75, the same run as --ratios 0.75 (equal error), and ratio_requested keeps the 0.9."""
    out = tmp_path / "r.json"
    argv = ["bench", *TINY, "--ratios", "0.75", "0.9", "--methods", "tome,tomesd,todo", "--inputs", "noise", "--repeats", "0", "--json", str(out)]
    with pytest.warns(UserWarning, match="exceeds the maximum 0.75"):
        assert cli.main(argv) == 0
    rows = {(r["method"], r["ratio_requested"]): r for r in json.loads(out.read_text())["rows"]}
    for method in ("tome", "tomesd"):
        asked, at_max = rows[(method, 0.9)], rows[(method, 0.75)]
        assert asked["ratio"] == at_max["ratio"] == 0.75 and at_max["ratio_requested"] == 0.75
        assert asked["rel_error"] == at_max["rel_error"] > 0  # the same configuration ran
    assert rows[("baseline", None)]["ratio"] is None and rows[("todo", None)]["ratio"] is None
    table = capsys.readouterr().out
    assert "0.75*" in table and "* tome: --ratios 0.9 is above its maximum; ran at 0.75" in table
    assert "* tomesd: --ratios 0.9 is above its maximum; ran at 0.75" in table and "0.90" not in table
