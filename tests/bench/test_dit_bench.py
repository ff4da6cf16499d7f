"""`tomesd-ext bench` on diffusion transformers: name checks, a tiny end-to-end run per family,
the flow schedule, the photo projection to DiT latent channels and the per-block timer."""

import json

import pytest
import torch

from tomesd_ext import cli
from tomesd_ext.models import DIT_NAMES
from tomesd_ext.models.video_configs import VIDEO_NAMES

TINY_DITS = [n for n in DIT_NAMES if n.startswith("tiny-") and n not in VIDEO_NAMES]  # video: test_video_dit_bench.py
RUN = ["--resolution", "64", "--repeats", "1", "--warmup", "0", "--inputs", "photo", "--no-progress"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "flux"], "use 'flux-depth4'"),
        (["--model", "qwen-image"], "use 'qwen-image-depth2'"),
        (["--model", "tiny-flux", "--methods", "todo"], "--methods todo: a UNet method"),
        (["--model", "tiny", "--methods", "tome-kv"], "--methods tome-kv: a diffusion-transformer method"),
        (["--model", "tiny-sd3", "--methods", "fbcache"], "--methods fbcache: SD3Transformer2DModel has no diffusers cache"),
        (["--model", "tiny", "--methods", "fbcache"], "--methods fbcache: a diffusion-transformer method"),
        (["--model", "tiny-flux", "--methods", "fbcache", "--cache-threshold", "-1"], "--cache-threshold -1.0: must be >= 0"),
        (["--model", "tiny", "--methods", "compile", "--compile-backend", "nope"], "--compile-backend nope: choose from"),
        (["--model", "tiny-sd3", "--methods", "baseline", "--micro"], "--micro"),
        (["--model", "tiny-sd3", "--methods", "baseline", "--resolution", "72"], "--resolution 72: must be a multiple of 16"),
    ],
)
def test_bad_dit_input_fails_before_work(argv, message, capsys, monkeypatch):
    import tomesd_ext.bench.subject as subject

    monkeypatch.setattr(subject, "load_subject", lambda *a, **k: pytest.fail("built a model"))
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", TINY_DITS)
def test_tiny_dit_bench_end_to_end(name, tmp_path, capsys):
    from tomesd_ext.models import get_dit_config

    out = tmp_path / "r.json"
    assert cli.main(["bench", "--model", name, *RUN, "--methods", "baseline", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["batch"] == (2 if get_dit_config(name)["cfg"] else 1)  # CFG pipelines: uncond + cond
    assert row["rel_error"] == 0.0 and row["speedup"] == 1.0 and row["ssim"] == 1.0
    assert row["block_seconds"]["transformer_blocks" if name != "tiny-z-image" else "layers"] > 0
    if name == "tiny-flux":
        assert row["block_seconds"]["single_transformer_blocks"] > 0
    assert doc["header"]["model"] == name and "sharpened" in doc["header"]["weights"]
    assert "first block of each kind" in capsys.readouterr().out


def test_tiny_dit_bench_with_merging(tmp_path):
    out = tmp_path / "r.json"
    # 768 px: a 48 x 48 token grid, above apply_tome's auto-skip threshold (2048 tokens)
    argv = ["bench", "--model", "tiny-sd3", *RUN, "--resolution", "768", "--batch", "1",
            "--methods", "tome,tome-block,tome-attn,tome-kv", "--json", str(out)]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["baseline", "tome", "tome-block", "tome-attn", "tome-kv"]
    assert all(r["rel_error"] > 0 for r in rows[1:])


def test_flow_schedule_and_predicted_x0_invert_each_other():
    from tomesd_ext.bench.denoise import predicted_x0
    from tomesd_ext.bench.flow import FlowSchedule

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 6, generator=gen), torch.randn(2, 16, 4, 6, generator=gen)
    sched = FlowSchedule()
    x_t = sched.add_noise(x0, noise, torch.tensor([250]))
    torch.testing.assert_close(x_t, 0.75 * x0 + 0.25 * noise)
    torch.testing.assert_close(predicted_x0(sched, x_t, noise - x0, 250), x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels", [4, 16, 32])
def test_photo_projection_round_trip(channels):
    import torch.nn.functional as F

    from tomesd_ext.bench.latent_map import channels_to_rgb, rgb_to_channels, rgb_to_latent

    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latent = rgb_to_channels(image, channels)
    assert latent.shape == (1, channels, 4, 6)
    torch.testing.assert_close(channels_to_rgb(latent), F.avg_pool2d(image, 8), rtol=0, atol=1e-5)
    if channels == 4:
        assert torch.equal(latent, rgb_to_latent(image))
    else:  # channels vary about as much as RGB does
        assert 0.5 < latent.std() / F.avg_pool2d(image, 8).std() < 2


def test_block_timer_times_first_blocks_and_leaves_no_hooks():
    from tomesd_ext.bench.parts import block_timer, first_blocks
    from tomesd_ext.models import build_transformer, dit_call, text_conditioning

    model = build_transformer("tiny-flux")
    cond = text_conditioning("flux", model.config, 1, 8, 0)
    hooks = [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in first_blocks(model).values()]
    with block_timer(model) as times, torch.no_grad():
        for _ in range(2):
            dit_call(model, "flux", torch.randn(1, 16, 8, 8), 500, cond["text"], cond["pooled"])
    assert {k: len(v) for k, v in times.items()} == {"transformer_blocks": 2, "single_transformer_blocks": 2}
    assert [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in first_blocks(model).values()] == hooks
    assert first_blocks(torch.nn.Linear(2, 2)) == {}


def _fits_here(name):
    from tomesd_ext.models import too_large

    return not too_large(name)


@pytest.mark.parametrize("name", ["tiny", *TINY_DITS, *filter(_fits_here, VIDEO_NAMES)])
def test_default_methods_fit_the_model(name, monkeypatch):
    """Without --methods the run is not refused: the default list is one the model's kind takes."""
    import tomesd_ext.bench.subject as subject
    from tomesd_ext.commands import bench

    monkeypatch.setattr(subject, "load_subject", lambda *a, **k: pytest.fail("built a model"))
    args = cli.build_parser().parse_args(["bench", "--model", name])
    bench.validate(args)
    kind = "unet" if name == "tiny" else "video" if name in VIDEO_NAMES else "dit"
    assert args.methods == list(bench.DEFAULT_METHODS[kind]) and "tome" in args.methods


def test_tiny_flux_runs_without_methods(tmp_path):
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--model", "tiny-flux", *RUN, "--json", str(out)]) == 0
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == ["baseline", "tome", "tome-attn", "tome-kv"]
