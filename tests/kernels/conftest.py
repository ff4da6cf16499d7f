import pytest

from tomesd_ext import kernels


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    """Every test starts from an unread TOMESD_EXT_KERNELS and an untried extension."""
    monkeypatch.delenv("TOMESD_EXT_KERNELS", raising=False)
    kernels.reset()
    yield
    kernels.reset()
