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
        (["--device", "cuda", "--clock", "cpu"], "--clock cpu times the CPU work of this process"),
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


def _refused_before_work(argv, monkeypatch, capsys):
    import tomesd_ext.bench.subject as subject

    monkeypatch.setattr(subject, "load_subject", lambda *a, **k: pytest.fail("built a model"))
    assert cli.main(["bench", "--model", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert "tomesd-ext bench: error:" in err and "Traceback" not in err
    return err


def test_fake_safetensors_file_is_refused_before_work(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "model.safetensors"
    fake.write_text("this is not a checkpoint")
    err = _refused_before_work(["--model", str(fake)], monkeypatch, capsys)
    assert "not a readable .safetensors checkpoint" in err


@pytest.mark.parametrize(
    "make, argv, message",
    [
        (lambda t: (t / "d").mkdir(), ["--json", "{t}/d"], "--json"),
        (lambda t: (t / "f").write_text(""), ["--json", "{t}/f/r.json"], "is a file, not a folder"),
        (lambda t: (t / "f").write_text(""), ["--images", "{t}/f"], "--images"),
        (lambda t: (t / "d").mkdir(), ["--plot", "{t}/d"], "--plot"),
    ],
)
def test_output_paths_are_checked_before_work(tmp_path, capsys, monkeypatch, make, argv, message):
    make(tmp_path)
    err = _refused_before_work([a.format(t=tmp_path) for a in argv], monkeypatch, capsys)
    assert message in err


def test_plot_without_suffix_gets_png_so_the_reported_path_is_true(tmp_path):
    from tomesd_ext.commands import bench as command

    args = cli.build_parser().parse_args(["bench", "--model", "tiny", "--plot", str(tmp_path / "tradeoff")])
    command.validate(args)
    assert args.plot == str(tmp_path / "tradeoff.png")
