"""`tomesd-ext calibrate`: a schedule file, its table and plot, loaded by apply_tome (tiny UNet)."""

import json

import pytest

from tomesd_ext import apply_tome, cli
from tomesd_ext.core import OptionError
from tomesd_ext.core.schedule import Schedule


def test_calibrate_writes_a_schedule_table_and_plot_that_apply_tome_loads(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    argv = ["calibrate", "tiny", "--resolution", "64", "--batch", "1", "--min-tokens", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| setting | group ratios |" in printed and "**chosen**" in printed and "uniform 0.5" in printed
    assert (tmp_path / "tiny.png").stat().st_size > 1000
    schedule = Schedule.load(str(out))
    info = schedule.info
    assert info["error"] <= info["budget"] == pytest.approx(info["uniform_error"])
    # one setting per block; the search groups cover the merging blocks once each, in order
    blocks = [b for g in info["groups"] for b in g]
    assert blocks == sorted(set(blocks)) and len(schedule.settings) == blocks[-1] + 1
    assert [schedule.settings[g[0]].ratio for g in info["groups"]] == info["group_ratios"]
    assert json.loads(out.read_text())["fingerprint"] == schedule.fingerprint

    from tomesd_ext.bench.subject import load_subject

    unet = load_subject("tiny", seed=0).denoiser  # the same built-in weights: accepted
    apply_tome(unet, schedule=str(out), min_tokens=0)
    other = load_subject("tiny", seed=1).denoiser  # other weights: refused, left unpatched
    with pytest.raises(OptionError, match="calibrated on another model"):
        apply_tome(other, schedule=str(out))
    assert "_tomesd_ext_patch" not in other.__dict__


@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown model"),
    (["tiny", "--resolution", "60"], "multiple of 8"),
    (["tiny", "--max-error", "0"], "--max-error 0.0"),
    (["tiny", "--out", "/no/such/folder/s.json"], "cannot write"),
    (["tiny", "--clock", "cpu", "--device", "cuda"], "--clock cpu"),
])
def test_bad_input_fails_before_work(argv, message, capsys):
    assert cli.main(["calibrate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_nothing_to_merge_is_a_clear_error(tmp_path, capsys):
    argv = ["calibrate", "tiny", "--resolution", "64", "--batch", "1", "--out", str(tmp_path / "s.json")]
    assert cli.main(argv) == 1  # 8x8 latent: below min_tokens 2048
    assert "--min-tokens 0" in capsys.readouterr().err and not (tmp_path / "s.json").exists()
