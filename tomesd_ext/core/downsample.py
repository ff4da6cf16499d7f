"""ToDo-style K/V token downsampling (Smith, Saxena & Saha, "ToDo: Token Downsampling for
Efficient Generation of High-Resolution Images", arXiv 2402.13573).

Queries stay whole; keys and values are computed from the token grid downsampled by `factor`
per axis (nearest neighbour). No similarity, no unmerge: the attention output keeps N rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Tuple, Union

import torch
import torch.nn.functional as F

from .options import MAX_DOWNSAMPLE_CHOICES, Option, _table, check_known, check_max_downsample, check_option

MODES = ("nearest", "nearest-exact")

TODO_OPTIONS = _table(
    Option("factor", "int", 2, "int in [1, 8]", "Downsampling of the key/value grid per axis (1 = off).", lo=1, hi=8),
    Option("max_downsample", "choice", "auto", "`\"auto\"`, " + ", ".join(str(d) for d in MAX_DOWNSAMPLE_CHOICES),
           "Levels with a larger downsample factor are left alone; auto = the highest-resolution level with attention.",
           choices=("auto",) + MAX_DOWNSAMPLE_CHOICES),
    Option("mode", "choice", "nearest", "`\"nearest\"`, `\"nearest-exact\"`",
           "Interpolation of the key/value grid: nearest (ComfyUI port) or nearest-exact (reference code).", choices=MODES),
)


def downsampled_size(h: int, w: int, factor: int) -> Tuple[int, int]:
    """Grid of the downsampled tokens: ceil(h / factor) x ceil(w / factor) (edges kept)."""
    return -(-h // factor), -(-w // factor)


def downsample_tokens(x: torch.Tensor, h: int, w: int, factor: int, mode: str = "nearest") -> torch.Tensor:
    """x: (B, h*w, C) row-major tokens -> (B, h2*w2, C) with (h2, w2) = downsampled_size(h, w, factor).

    factor 1 returns x itself (exact identity).
    """
    B, N, C = x.shape
    if N != h * w:
        raise ValueError(f"x has {N} tokens, grid {h}x{w} has {h * w}")
    if factor == 1:
        return x
    h2, w2 = downsampled_size(h, w, factor)
    grid = x.transpose(1, 2).reshape(B, C, h, w)
    small = F.interpolate(grid, size=(h2, w2), mode=mode)
    return small.flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class ToDoOptions:
    """Options of ToDo K/V downsampling, validated by `create`.

    factor: downsampling per axis of the K/V grid (1 = off), in [1, 8].
    max_downsample: "auto" (the highest-resolution level with attention) or 1/2/4/8...: levels
        with a larger downsample factor are left alone (the reference applies it at d=1 only).
    mode: "nearest" (ComfyUI port) or "nearest-exact" (reference code).
    """

    factor: int = 2
    max_downsample: Union[int, str] = "auto"
    mode: str = "nearest"

    @classmethod
    def create(cls, **kwargs) -> "ToDoOptions":
        check_known(cls, kwargs)
        o = cls(**kwargs)
        check_option(TODO_OPTIONS["factor"], o.factor)
        check_max_downsample(o.max_downsample)
        check_option(TODO_OPTIONS["mode"], o.mode)
        return replace(o)


class ToDoPolicy:
    """ToDo for ``MergeRuntime``: self-attention at a merged level takes its keys and values from
    ``downsample_tokens`` of its input; queries and output keep all N tokens."""

    def __init__(self, opts: ToDoOptions):
        self.opts = opts

    def keys_values(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """x: (B, h*w, C) -> (B, h2*w2, C) for grid (h, w)."""
        return downsample_tokens(x, grid[0], grid[1], self.opts.factor, self.opts.mode)
