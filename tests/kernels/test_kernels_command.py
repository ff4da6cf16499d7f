"""`tomesd-ext kernels [--build]` (CPU: reports; the build itself is covered by test_compile)."""

from tomesd_ext.commands import kernels as command
from tomesd_ext.kernels import build


def test_status_report(capsys, monkeypatch):
    monkeypatch.setenv("TOMESD_EXT_KERNELS", "torch")
    assert command.main([]) == 0
    out = capsys.readouterr().out
    assert "TOMESD_EXT_KERNELS=torch" in out
    assert "backend for CUDA tensors: torch (TOMESD_EXT_KERNELS=torch)" in out


def test_bad_setting_is_a_clear_error_with_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("TOMESD_EXT_KERNELS", "bogus")
    assert command.main([]) == 2
    captured = capsys.readouterr()
    assert "tomesd-ext kernels: error: TOMESD_EXT_KERNELS='bogus' is not allowed: use one of auto, cuda, torch" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_build_reports_missing_requirement(capsys, monkeypatch):
    monkeypatch.setattr(build, "missing_requirement", lambda: "nvcc not found (set CUDA_HOME to a CUDA toolkit)")
    assert command.main(["--build"]) == 1
    assert "cannot build: nvcc not found" in capsys.readouterr().out


def test_build_reports_failure(capsys, monkeypatch):
    monkeypatch.setattr(build, "missing_requirement", lambda: None)

    def fail(verbose=False):
        raise RuntimeError("building the CUDA extension in /x failed: Error building extension")

    monkeypatch.setattr(build, "load", fail)
    assert command.main(["--build"]) == 1
    assert "build FAILED" in capsys.readouterr().out


def test_registered_in_cli():
    from tomesd_ext import cli

    assert cli.COMMANDS["kernels"] == "kernels"
