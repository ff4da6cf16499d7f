"""The ToMe-SD policy: window partition + bipartite soft matching for one block call.

Follows Bolya & Hoffman, "Token Merging for Fast Stable Diffusion" (2023), with explicit,
keyed randomness instead of a forked global RNG.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from .grid import tokens_to_remove
from .matching import bipartite_plan
from .options import ToMeOptions
from .partition import derive_seed, window_partition
from .plan import MergePlan


@lru_cache(maxsize=256)
def _cached_partition(h, w, sx, sy, seed, device, frames=1, st=1):
    return window_partition(h, w, sx, sy, seed, device, frames, st)


def partition_seed(opts: ToMeOptions, *keys) -> Optional[int]:
    """Seed of one partition: None (top-left windows) when use_rand is off, else hash(seed, keys)."""
    return derive_seed(opts.seed, *keys) if opts.use_rand else None


def tome_plan(
    metric: torch.Tensor, h: int, w: int, opts: ToMeOptions, seed: Optional[int], frames: int = 1, partition=None,
    ratio: Optional[float] = None,
) -> Optional[MergePlan]:
    """Plan for a (B, frames*h*w, C) metric on a frames x h x w grid, or None when nothing would
    be merged.

    The partition has no batch dimension: every sample of the call (cond and uncond halves,
    several images) uses the same destinations; matching is per sample and global, so in a video
    a source merges into the most similar destination of any frame (of the frames within
    opts.frame_reach when set). Video windows span opts.st frames (images and st = 1: one frame). partition: (dst, src) drawn already for this seed
    (``TomePolicy.draw_partition``); seed is then unused. ratio: this block's (per-block settings),
    None: opts.ratio.
    """
    n = frames * h * w
    if metric.shape[1] != n:
        raise ValueError(f"metric has {metric.shape[1]} tokens, grid {frames}x{h}x{w} has {n}")
    st = opts.st if frames > 1 else 1
    if partition is None:
        partition = _cached_partition(h, w, opts.sx, opts.sy, seed, metric.device, frames, st)
    dst, src = partition
    r = tokens_to_remove(opts.ratio if ratio is None else ratio, n, src.numel())
    if r == 0 or dst.numel() == 0:
        return None
    if frames == 1:
        return bipartite_plan(metric, dst, src, r, grid=(h, w))
    return bipartite_plan(metric, dst, src, r, grid=(frames, h, w), frame_reach=opts.frame_reach)


class TomePolicy:
    """The ToMe-SD policy for ``MergeRuntime``: random window destinations, bipartite matching.

    queries_only: the adapter merges only the queries of self-attention (keys and values keep
    every token), as ComfyUI's built-in ToMe node does; the plan is the same.
    """

    def __init__(self, opts: ToMeOptions, queries_only: bool = False):
        self.opts = opts
        self.queries_only = queries_only

    def draw_partition(self, h: int, w: int, seed: Optional[int], device, frames: int = 1):
        """(dst, src) partition of a frames x h x w grid (shared, cached tensors: copy before writing)."""
        st = self.opts.st if frames > 1 else 1
        return _cached_partition(h, w, self.opts.sx, self.opts.sy, seed, device, frames, st)

    def plan(self, metric: torch.Tensor, h: int, w: int, seed: Optional[int], frames: int = 1, partition=None,
             ratio: Optional[float] = None) -> Optional[MergePlan]:
        return tome_plan(metric, h, w, self.opts, seed, frames, partition, ratio)
