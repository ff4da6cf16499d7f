"""Kernel dispatch: CUDA tensors use the CUDA extension when it is available, else the exact torch path.

TOMESD_EXT_KERNELS chooses, read once per process (``reset()`` re-reads it):
- ``auto`` (default): the first kernel call on a CUDA tensor builds/loads the extension; if that
  is impossible (CPU-only torch, no nvcc/ninja/compiler, build error) one warning line is logged
  and the torch path runs from then on;
- ``cuda``: the extension must load; the first kernel call on a CUDA tensor raises RuntimeError
  with the reason otherwise (CPU tensors always run the torch path, there is no CPU kernel);
- ``torch``: always the torch path (torch_ops.py, the reference).
Any other value raises ValueError naming the variable, the value and the allowed values, on the
first kernel call or earlier from ``check_kernel_setting()`` (for the adapters to call when patching).
The decision is cached: after the first call a dispatch costs one attribute test.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import torch

from . import torch_ops

ENV = "TOMESD_EXT_KERNELS"
ALLOWED = ("auto", "cuda", "torch")
log = logging.getLogger("tomesd_ext.kernels")

# Use the tensor-core matcher for float16/bfloat16; TOMESD_EXT_TENSOR_CORES=0 (or tests) selects
# the SIMT kernel instead.
TENSOR_CORES = os.environ.get("TOMESD_EXT_TENSOR_CORES", "1").strip() != "0"


class _State:
    mode: Optional[str] = None
    tried = False
    ext = None
    reason: Optional[str] = None


_state = _State()


def mode() -> str:
    """The requested backend: "auto", "cuda" or "torch" (from TOMESD_EXT_KERNELS, read once)."""
    if _state.mode is None:
        choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
        if choice not in ALLOWED:
            raise ValueError(f"{ENV}={choice!r} is not allowed: use one of {', '.join(ALLOWED)}")
        _state.mode = choice
    return _state.mode


def check_kernel_setting() -> str:
    """Validate TOMESD_EXT_KERNELS now; returns the mode ("auto", "cuda" or "torch").

    Raises ValueError naming the variable, its value and the allowed values. Loads nothing: with
    "cuda" and no usable extension, only kernel calls on CUDA tensors fail.
    """
    return mode()


def reset() -> None:
    """Forget the cached decision (re-read the environment, retry loading on next use)."""
    _state.mode = None
    _state.tried = False
    _state.ext = None
    _state.reason = None


def extension(required: bool = False):
    """The loaded CUDA extension module, or None (reason in ``status()``).

    The first call builds/loads it (unless the mode is "torch"); with mode "cuda" or
    required=True a failure raises RuntimeError.
    """
    if not _state.tried:
        _state.tried = True
        m = mode()
        if m == "torch":
            _state.reason = f"{ENV}=torch"
        else:
            try:
                if not torch.cuda.is_available():
                    raise RuntimeError("no CUDA device is visible to torch")
                from .build import load

                _state.ext = load()
            except RuntimeError as exc:
                _state.reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if m == "auto":
                    log.warning("tomesd-ext: CUDA kernels unavailable (%s); using the exact torch path", _state.reason)
    if _state.ext is None and (required or mode() == "cuda"):
        raise RuntimeError(f"{ENV}={mode()} requires the CUDA kernels, which are unavailable: {_state.reason}")
    return _state.ext


def backend() -> str:
    """The backend CUDA tensors use in this process: "cuda" or "torch".

    Loads (or builds) the extension if that was not tried yet; raises RuntimeError when
    TOMESD_EXT_KERNELS=cuda and the extension is unavailable.
    """
    return "cuda" if extension() is not None else "torch"


def status() -> dict:
    """{"mode", "backend", "reason"}: what runs and why the torch path is used (never raises)."""
    try:
        b = backend()
    except RuntimeError:
        b = "unavailable"
    return {"mode": mode(), "backend": b, "reason": _state.reason}


def _cuda(t: torch.Tensor):
    """The extension when t should use it, else None. CPU tensors always take the torch path."""
    if _state.tried and _state.ext is None and _state.mode != "cuda":
        return None
    if not t.is_cuda:
        if _state.mode is None:
            mode()  # a bad TOMESD_EXT_KERNELS fails here, on CPU too
        return None
    ext = extension()
    if ext is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    return ext


# ------------------------------------------------------------------ public kernels


def best_match(src: torch.Tensor, dst: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """src: (B, S, C), dst: (B, D, C), L2-normalised -> (score (B, S) float32, index (B, S) long).

    Ties resolve to the lowest destination index on both paths.
    """
    ext = _cuda(src)
    if ext is None or dst.shape[1] == 0:
        return torch_ops.best_match(src, dst)
    return tuple(ext.best_match(src, dst, 1, False, TENSOR_CORES))


def best_match_aligned(
    src: torch.Tensor, dst: torch.Tensor, groups: int = 2, reduce: str = "max"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One matching shared by `groups` slices of the batch (VidToMe's align_batch for CFG).

    src: (G*b, S, C), dst: (G*b, D, C) -> (score, index) (b, S): score of (s, d) for sample j is the
    max (or mean) over g of <src[g*b + j, s], dst[g*b + j, d]>.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce={reduce!r} is not allowed: use 'max' or 'mean'")
    if groups < 1 or src.shape[0] % groups:
        raise ValueError(f"batch {src.shape[0]} is not a multiple of groups={groups}")
    ext = _cuda(src)
    if ext is None or dst.shape[1] == 0:
        return torch_ops.best_match_aligned(src, dst, groups, reduce)
    return tuple(ext.best_match(src, dst, groups, reduce == "mean", TENSOR_CORES))


def best_match_to_frame(
    frames: torch.Tensor, target: int, groups: int = 1, reduce: str = "max"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """VidToMe's local matching: every token of the other frames against the tokens of one frame.

    frames: (B, F, N, C) L2-normalised tokens of a chunk of F frames; target: frame index.
    Returns (score, index) of shape (B/groups, (F-1)*N): sources are the other frames' tokens in
    frame order, index is a token of the target frame (in [0, N)).
    """
    B, F, N, C = frames.shape
    if not -F <= target < F:
        raise ValueError(f"target={target} is out of range for {F} frames")
    target %= F
    dst = frames[:, target]
    src = torch.cat([frames[:, :target], frames[:, target + 1 :]], dim=1).reshape(B, (F - 1) * N, C)
    if groups == 1 and reduce == "max":
        return best_match(src, dst)
    return best_match_aligned(src, dst, groups, reduce)


def merge_mean(
    x: torch.Tensor, group: torch.Tensor, size: torch.Tensor, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Size-weighted mean per group: x (B, N, C), group (B, N), size (B, M), weight (B, N) -> (B, M, C).

    The CUDA path sums each group's members in token order (no atomics): deterministic.
    """
    ext = _cuda(x)
    if ext is None:
        return torch_ops.merge_mean(x, group, size, weight)
    from .csr import group_csr

    order, offsets = group_csr(group, size.shape[1])
    return ext.merge_csr(x, order, offsets, weight, size)


def unmerge_gather(y: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Copy each group's value back to its members: y (B, M, C), group (B, N) -> (B, N, C)."""
    ext = _cuda(y)
    if ext is None:
        return torch_ops.unmerge_gather(y, group)
    return ext.unmerge_gather(y, group)
