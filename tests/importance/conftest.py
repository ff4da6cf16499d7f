import pytest


@pytest.fixture(autouse=True)
def merge_small_grids(monkeypatch):
    """The tiny pipelines here have grids of a few hundred tokens, below the auto-skip threshold
    (ToMeOptions.min_tokens, docs/benchmarks.md): merge every grid in these tests."""
    monkeypatch.setattr("tomesd_ext.core.options.MIN_TOKENS_DEFAULT", 0)
