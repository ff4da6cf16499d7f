"""The ToMe-SD policy: window partition + bipartite soft matching for one block call.

Follows Bolya & Hoffman, "Token Merging for Fast Stable Diffusion" (2023), with explicit,
keyed randomness instead of a forked global RNG.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from .grid import level_grid, tokens_to_remove
from .matching import bipartite_plan
from .options import ToMeOptions
from .partition import derive_seed, window_partition
from .plan import MergePlan


@lru_cache(maxsize=256)
def _cached_partition(h, w, sx, sy, seed, device):
    return window_partition(h, w, sx, sy, seed, device)


def partition_seed(opts: ToMeOptions, *keys) -> Optional[int]:
    """Seed of one partition: None (top-left windows) when use_rand is off, else hash(seed, keys)."""
    return derive_seed(opts.seed, *keys) if opts.use_rand else None


def tome_plan(metric: torch.Tensor, h: int, w: int, opts: ToMeOptions, seed: Optional[int]) -> Optional[MergePlan]:
    """Plan for a (B, h*w, C) metric on an h x w grid, or None when nothing would be merged.

    The partition has no batch dimension: every sample of the call (cond and uncond halves,
    several images) uses the same destinations; matching is per sample.
    """
    n = h * w
    if metric.shape[1] != n:
        raise ValueError(f"metric has {metric.shape[1]} tokens, grid {h}x{w} has {n}")
    dst, src = _cached_partition(h, w, opts.sx, opts.sy, seed, metric.device)
    r = tokens_to_remove(opts.ratio, n, src.numel())
    if r == 0 or dst.numel() == 0:
        return None
    return bipartite_plan(metric, dst, src, r, grid=(h, w))


def level_plan(
    metric: torch.Tensor, latent_hw, step_key, opts: ToMeOptions, max_downsample: int, cache=None, scope=None,
    planner=None,
) -> Optional[MergePlan]:
    """The plan of one block call inside a UNet, or None when its level is not merged.

    metric: (B, N, C) normed hidden states; latent_hw: (H, W) of the denoiser's input latent;
    step_key: the denoiser's timestep (see `timestep_key`). The grid comes from N and (H, W);
    levels with downsample factor above `max_downsample`, grids below `opts.min_tokens` (or tokens
    that are no grid, e.g. a temporal block) are not merged. One partition per (seed, step, level): every block of a
    level draws the same destinations in a step (matching stays per block), so the diffusers
    and ComfyUI adapters, which both call this, agree exactly. cache: an optional `PlanCache`
    (plan reuse across blocks/steps), keyed by (scope, h, w, batch, device). planner:
    (metric, h, w, opts, seed) -> plan, the destination policy (default `tome_plan`).
    """
    if latent_hw is None or metric.ndim != 3:
        return None
    found = level_grid(metric.shape[1], latent_hw)
    if found is None or found[0] > max_downsample:
        return None
    _, h, w = found
    if h * w < opts.min_tokens:
        return None  # auto-skip: merging cannot pay at this token count (ToMeOptions.min_tokens)
    seed = partition_seed(opts, step_key, h, w)
    planner = planner or tome_plan
    if cache is None:
        return planner(metric, h, w, opts, seed)
    key = (scope, h, w, metric.shape[0], metric.device)
    return cache.get(key, lambda: planner(metric, h, w, opts, seed))
