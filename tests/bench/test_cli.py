"""`tomesd-ext bench` rejects bad input before any work, with exit status 2."""

import pytest

from tomesd_ext import cli


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "sd99"], "unknown model 'sd99'"),
        (["--model", "/no/such/folder"], "no such file or folder"),
        (["--model", "missing.safetensors"], "no such file or folder"),
        (["--methods", "tome,fastest"], "unknown method 'fastest'"),
        (["--resolution", "512", "500"], "--resolution 500: must be a multiple of 8"),
        (["--ratios", "1.2"], "--ratios 1.2"),
        (["--repeats", "-1"], "--repeats -1"),
        (["--inputs", "photo,cats"], "--inputs cats"),
        (["--timestep", "1000"], "--timestep 1000"),
    ],
)
def test_bad_input_fails_before_work(argv, message, capsys, monkeypatch):
    import tomesd_ext.bench.subject as subject

    monkeypatch.setattr(subject, "load_subject", lambda *a, **k: pytest.fail("built a model"))
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err


def test_folder_without_pipeline_is_rejected(tmp_path, capsys):
    assert cli.main(["bench", "--model", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_argparse_rejects_bad_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--dtype", "fp8"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["bench", "--resolution", "big"])


def test_bench_is_registered():
    assert cli.COMMANDS["bench"] == "bench"
    assert "bench" in cli.build_parser().format_help()
