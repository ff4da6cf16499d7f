"""Block mode on the transformer blocks of a UNet (``unet_mode="block"``), for every adapter.

ToMe-SD merges around single operators of a block (self-attention, and optionally cross-attention
and the feed-forward), each time unmerging by copy. Block mode merges a block's image tokens once
and runs the whole block on them (self-attention, cross-attention, feed-forward, every projection
and norm), then unmerges the block's *update*: ``y = x + unmerge(f(merge(x)) - merge(x))``, the
transformers' block mode (core/dit.py: ``merge_span``, ``unmerge_update``) with the whole
sequence as the span (a UNet block holds only image tokens). Every token keeps its own residual
stream; within a group the update is shared.

The plan comes from the block's ``BlockSlot`` (so plan reuse, importance mode, the shared plan of
an AnimateDiff clip and gradient-checkpoint replay work as in ToMe-SD mode), computed on the
block's input tokens centred per token (``block_metric``: the cosine of LayerNorm(x) without its
affine part, what the block's first norm hands attention).

An adapter calls ``merge_block(slot, x)`` before the block runs (merged tokens, or None: run it as
it is) and ``unmerge_block`` on its output.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dit import merge_span, unmerge_update
from .plan import MergePlan

# unet_mode "auto" (docs/benchmarks.md, "UNet block mode"): SD 1.5 at 512², ratio 0.5, block mode
# was 1.14x against ops' 1.07x but at 1.6x tomesd's error (0.132 vs 0.083), so ops stays the default.
UNET_DEFAULT_MODE = "ops"


def unet_mode(opts) -> str:
    """The mode a UNet patch runs: "ops" (ToMe-SD: merged around the operators merge_attn,
    merge_crossattn, merge_mlp name) or "block"; "auto" takes the measured default."""
    mode = getattr(opts, "unet_mode", "auto")
    return UNET_DEFAULT_MODE if mode == "auto" else mode


def block_metric(x: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C) a block's input -> its tokens centred per token (the matching metric)."""
    return x - x.mean(dim=-1, keepdim=True)


def merge_block(slot, x, chunk: Optional[int] = None) -> Optional[Tuple[torch.Tensor, MergePlan]]:
    """(merged tokens (B, N - r, C), plan) for a block call on x (B, N, C), or None when this call
    is not merged (the runtime is not merging, x is no merged level's grid, ratio 0).
    chunk: the block feeds its tokens to the feed-forward in chunks of this many (diffusers'
    forward chunking along tokens): a merged count that is no multiple of it is not merged."""
    rt = slot.runtime
    if not rt.active or not isinstance(x, torch.Tensor) or x.ndim != 3 or rt.level(x.shape[1]) is None:
        return None
    with torch.no_grad():  # the metric only chooses the plan
        plan = slot.get(block_metric(x))
    if plan is None or (chunk and plan.n_groups % chunk):
        return None
    return merge_span(x, plan, 0), plan


def unmerge_block(x: torch.Tensor, merged: torch.Tensor, y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """The full-length output (B, N, C) of a block that ran on ``merged`` = merge_block(...)[0]:
    every token gets its own input plus its group's update."""
    return unmerge_update(x, merged, y, plan, 0)
