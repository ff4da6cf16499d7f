"""Kernels of token merging: fused matching, merge (size-weighted mean), unmerge (gather).

CUDA tensors use the CUDA extension (sources in tomesd_ext/kernels/cuda/, built on first use or with
`tomesd-ext kernels --build`) when available; everything else runs the exact torch path in
torch_ops.py, which is the reference. TOMESD_EXT_KERNELS=auto|cuda|torch chooses (dispatch.py).
"""

from __future__ import annotations

from .dispatch import (
    backend,
    best_match,
    best_match_aligned,
    best_match_to_frame,
    check_kernel_setting,
    extension,
    merge_mean,
    mode,
    reset,
    status,
    unmerge_gather,
)

__all__ = [
    "backend",
    "best_match",
    "best_match_aligned",
    "best_match_to_frame",
    "check_kernel_setting",
    "extension",
    "merge_mean",
    "mode",
    "reset",
    "status",
    "unmerge_gather",
]
