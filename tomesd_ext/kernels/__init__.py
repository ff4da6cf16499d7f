"""Kernel dispatch: the CUDA extension where available (see cuda/), else the exact torch path.

TOMESD_EXT_KERNELS=auto|cuda|torch chooses; "auto" is the torch path until the extension lands.
"""

from __future__ import annotations

import os

from .torch_ops import best_match, merge_mean, unmerge_gather

_ALLOWED = ("auto", "cuda", "torch")


def backend() -> str:
    """The kernel backend in use for this process ("torch" or "cuda")."""
    choice = os.environ.get("TOMESD_EXT_KERNELS", "auto").lower()
    if choice not in _ALLOWED:
        raise ValueError(f"TOMESD_EXT_KERNELS={choice!r} is not allowed: use one of {_ALLOWED}")
    return "torch"


__all__ = ["best_match", "merge_mean", "unmerge_gather", "backend"]
