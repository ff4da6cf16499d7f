"""TOMESD_EXT_KERNELS handling, the cached decision and the one-line fallback (CPU)."""

import logging

import pytest
import torch

from tomesd_ext import kernels
from tomesd_ext.kernels import build, dispatch, torch_ops


def test_default_mode_is_auto_and_cpu_tensors_take_torch_path(monkeypatch):
    calls = []
    monkeypatch.setattr(build, "load", lambda *a, **k: calls.append(1))
    assert kernels.mode() == "auto"
    x = torch.randn(1, 4, 3)
    kernels.best_match(x, x)
    kernels.merge_mean(x, torch.zeros(1, 4, dtype=torch.long), torch.full((1, 1), 4.0))
    kernels.unmerge_gather(x, torch.zeros(1, 4, dtype=torch.long))
    assert calls == []  # CPU tensors never trigger a build


@pytest.mark.parametrize("value,expected", [("torch", "torch"), ("CUDA", "cuda"), (" auto ", "auto"), ("", "auto")])
def test_mode_values(monkeypatch, value, expected):
    monkeypatch.setenv("TOMESD_EXT_KERNELS", value)
    assert kernels.mode() == expected


def test_bad_mode_names_value_and_choices(monkeypatch):
    monkeypatch.setenv("TOMESD_EXT_KERNELS", "triton")
    with pytest.raises(ValueError, match=r"TOMESD_EXT_KERNELS='triton' is not allowed: use one of auto, cuda, torch"):
        kernels.best_match(torch.randn(1, 2, 2), torch.randn(1, 2, 2))


@pytest.mark.parametrize("value", ["bogus", "cuda:0", "1"])
def test_check_kernel_setting_refuses_a_bad_value_before_any_forward(monkeypatch, value):
    monkeypatch.setenv("TOMESD_EXT_KERNELS", value)
    with pytest.raises(ValueError, match=rf"TOMESD_EXT_KERNELS='{value}' is not allowed: use one of auto, cuda, torch"):
        kernels.check_kernel_setting()
    monkeypatch.setenv("TOMESD_EXT_KERNELS", "Torch")
    assert kernels.check_kernel_setting() == "torch"


def test_decision_is_cached_until_reset(monkeypatch):
    monkeypatch.setenv("TOMESD_EXT_KERNELS", "torch")
    assert kernels.mode() == "torch"
    monkeypatch.setenv("TOMESD_EXT_KERNELS", "cuda")
    assert kernels.mode() == "torch"
    kernels.reset()
    assert kernels.mode() == "cuda"


def test_torch_mode_never_loads(monkeypatch):
    monkeypatch.setenv("TOMESD_EXT_KERNELS", "torch")
    monkeypatch.setattr(build, "load", lambda *a, **k: pytest.fail("load called"))
    assert kernels.backend() == "torch"
    assert kernels.status() == {"mode": "torch", "backend": "torch", "reason": "TOMESD_EXT_KERNELS=torch"}


def test_auto_fallback_logs_one_line(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def failing_load(*a, **k):
        raise RuntimeError("nvcc not found (set CUDA_HOME to a CUDA toolkit)")

    monkeypatch.setattr(build, "load", failing_load)
    with caplog.at_level(logging.WARNING, logger="tomesd_ext.kernels"):
        assert kernels.backend() == "torch"
        assert kernels.extension() is None
        assert kernels.backend() == "torch"
    lines = [r.getMessage() for r in caplog.records if r.name == "tomesd_ext.kernels"]
    assert lines == [
        "tomesd-ext: CUDA kernels unavailable (nvcc not found (set CUDA_HOME to a CUDA toolkit)); using the exact torch path"
    ]
    assert kernels.status()["reason"].startswith("nvcc not found")


def test_forced_cuda_unavailable_raises_clear_error(monkeypatch, caplog):
    monkeypatch.setenv("TOMESD_EXT_KERNELS", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(build, "load", lambda *a, **k: pytest.fail("load called for CPU tensors"))
    x = torch.randn(1, 4, 3)
    # CPU tensors take the torch path, as documented (there is no CPU kernel)
    assert torch.equal(kernels.best_match(x, x)[1], torch_ops.best_match(x, x)[1])
    kernels.merge_mean(x, torch.zeros(1, 4, dtype=torch.long), torch.full((1, 1), 4.0))
    kernels.unmerge_gather(x, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="TOMESD_EXT_KERNELS=cuda requires the CUDA kernels, which are unavailable: no CUDA device"):
        kernels.backend()
    assert kernels.status()["backend"] == "unavailable"
    assert not [r for r in caplog.records if r.name == "tomesd_ext.kernels"]  # an error, not a log line


def test_forced_cuda_with_extension_keeps_cpu_tensors_on_torch(monkeypatch):
    monkeypatch.setenv("TOMESD_EXT_KERNELS", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    class FakeExt:
        def __getattr__(self, name):
            pytest.fail(f"CPU tensor reached the extension ({name})")

    monkeypatch.setattr(build, "load", lambda *a, **k: FakeExt())
    x = torch.randn(1, 4, 3)
    score, index = kernels.best_match(x, x)
    assert index.shape == (1, 4)
    assert kernels.backend() == "cuda"


def test_missing_requirement_reports_a_reason_or_none():
    reason = build.missing_requirement()
    if torch.version.cuda is None:
        assert "CPU-only" in reason
    else:
        assert reason is None or isinstance(reason, str)


def test_build_dir_is_per_torch_and_cuda_version(monkeypatch, tmp_path):
    monkeypatch.setenv("TOMESD_EXT_CACHE", str(tmp_path))
    d = build.build_dir()
    assert d.parent == tmp_path
    assert torch.__version__.replace("+", "_") in d.name and f"cu{torch.version.cuda or 'none'}" in d.name


def test_dispatch_fast_path_after_fallback(monkeypatch):
    # after a failed load in auto mode, _cuda returns None without touching the tensor's device
    dispatch._state.mode, dispatch._state.tried, dispatch._state.ext = "auto", True, None
    assert dispatch._cuda(torch.randn(1)) is None
