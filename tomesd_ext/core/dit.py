"""Token merging inside diffusion-transformer (DiT) blocks: image tokens only, positions carried.

ToMe (Bolya et al. 2023) applied to the blocks of image transformers (Flux, SD3, PixArt...), in
the two ways the transformer papers use (ToMA, ICML 2025; SDTM, CVPR 2025; ToDo for the second):

- ``block``: the image tokens of a block's input are merged (n -> n - r) and the block's *update*
  is unmerged after it, ``y = x + unmerge(f(merge(x)) - merge(x))``: every token keeps its own
  residual stream while projections, attention and MLP all run on fewer tokens (the large
  saving: in a DiT block the linear layers cost more than attention).
- ``attn``: the same around each image attention only (its normed input merged, its output
  unmerged): projections and attention run on fewer tokens, the MLP on all of them.
- ``kv``: queries keep every token; inside attention, after rotary positions are applied, the
  keys and values of the image tokens are merged, and log(group size) is added to a merged key's
  logits (proportional attention: a group of similar keys weighs as much as its members). No
  unmerge; the safe mode.

A sequence holds the n image tokens of an h x w grid as one span ``[start, start + n)``; text
tokens (joint attention) and reference-image tokens around the span are never merged.

Deviations from ToMe-SD: one plan serves every sample of a call (the cond and uncond halves of a
CFG batch denoise the same latent), so positional tables without a batch dimension can follow the
tokens; its metric is the batch mean of the centred, normalised tokens. A group sits at the
position of its anchor (its destination, or the kept token itself): rotary tables, masks and
modulation indices are gathered there (``gather_span``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .merge import merge, unmerge
from .options import OptionError
from .plan import MergePlan


def shared_metric(x: torch.Tensor) -> torch.Tensor:
    """x: (B, n, C) image tokens -> (1, n, C) float32: batch mean of the centred, unit-norm rows.

    Centring makes the cosine that of LayerNorm(x), what a block's attention sees."""
    m = x.float()
    m = m - m.mean(dim=-1, keepdim=True)
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return m.mean(dim=0, keepdim=True)


def span_plan(slot, x, start: int) -> Optional[MergePlan]:
    """The plan of one block call for the image span [start, start + n) of x (B, L, C), n the
    call's grid tokens; None when the runtime is not merging this call, the grid is below
    ``min_tokens`` (checked before any work), or x holds no such span. slot: the block's
    ``BlockSlot`` (its first call in a block computes the plan, later calls reuse it)."""
    rt = slot.runtime
    if not rt.active or rt.below_min_tokens(rt.grid_shape):
        return None
    n = rt.grid_tokens
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[1] < start + n:
        return None
    with torch.no_grad():  # the metric only chooses the plan: nothing to keep for backward
        metric = shared_metric(x[:, start : start + n])
    return slot.get(metric)


def merged_video_grid(grid, keep_first_frame: bool):
    """(grid, held) of a video call: the token grid it merges and the frames held back before it.
    grid: (frames, h, w); keep_first_frame holds the first latent frame back (held 1). The merged
    grid is (frames', h, w), (h, w) when one frame is left, None when none is."""
    held = int(bool(keep_first_frame))
    f, h, w = grid
    f -= held
    return ((f, h, w) if f > 1 else (h, w) if f == 1 else None), held


def anchors(plan: MergePlan) -> torch.Tensor:
    """(M,) long: the token whose position each group of a batch-shared plan carries."""
    if plan.anchor is None or plan.anchor.shape[0] != 1:
        raise ValueError("DiT merging needs a batch-shared plan with anchors (plan_from_matches builds them)")
    return plan.anchor[0]


def merge_span(x: torch.Tensor, plan: MergePlan, start: int) -> torch.Tensor:
    """x: (B, L, C) with the plan's n tokens at [start, start + n) -> (B, L - r, C)."""
    n = plan.n_tokens
    if start == 0 and x.shape[1] == n:  # the whole sequence is the span (a UNet block, PixArt)
        return merge(x, plan)
    span = merge(x[:, start : start + n], plan)
    return torch.cat([x[:, :start], span, x[:, start + n :]], dim=1)


def unmerge_update(x: torch.Tensor, x_merged: torch.Tensor, y_merged: torch.Tensor, plan: MergePlan, start: int) -> torch.Tensor:
    """The full-length output of a block that ran on merged tokens.

    x: (B, L, C) the block's input; x_merged = merge_span(x, plan, start): (B, L - r, C);
    y_merged: (B, L - r, C) the block's output. Tokens outside the span come from y_merged; each
    image token gets its own input plus its group's update: x + unmerge(y - x_merged).
    """
    n, m = plan.n_tokens, plan.n_groups
    if start == 0 and x.shape[1] == n:  # nothing around the span: no concatenation
        return x + unmerge(y_merged - x_merged, plan).to(x.dtype)
    update = y_merged[:, start : start + m] - x_merged[:, start : start + m]
    span = x[:, start : start + n] + unmerge(update, plan).to(x.dtype)
    return torch.cat([y_merged[:, :start], span, y_merged[:, start + m :]], dim=1)


def unmerge_span(y: torch.Tensor, plan: MergePlan, start: int) -> torch.Tensor:
    """y: (B, L - r, C), the output of an operator that ran on merge_span(x, plan, start) ->
    (B, L, C): every image token gets its group's output (attention-only merging)."""
    m = plan.n_groups
    return torch.cat([y[:, :start], unmerge(y[:, start : start + m], plan), y[:, start + m :]], dim=1)


def gather_span(t: torch.Tensor, plan: MergePlan, start: int, dim: int) -> torch.Tensor:
    """Positions of a merged sequence: t's entries along ``dim`` (a rotary table, a mask, a
    modulation index over the sequence) with the span [start, start + n) replaced by the entries
    of the groups' anchors. Length along dim: L -> L - r."""
    idx = anchors(plan).to(t.device) + start
    n = plan.n_tokens
    length = t.shape[dim]
    keep = torch.cat([torch.arange(start, device=t.device), idx, torch.arange(start + n, length, device=t.device)])
    return t.index_select(dim, keep)


def merge_keys_values(
    key: torch.Tensor,
    value: torch.Tensor,
    plan: MergePlan,
    start: int,
    mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys/values-only merging inside attention, with proportional attention.

    key, value: (B, H, L, D) after rotary positions, the image span at [start, start + n) of L.
    mask: None or an SDPA mask broadcastable to (B, H, Lq, L) (bool: True = attend; float: added).
    Returns (key, value, mask) with L - r keys; the mask is float and adds log(group size) to the
    merged image keys (a masked-out anchor masks its group).
    """
    b, h, length, d = key.shape

    def tokens(t):  # (B, H, L, D) -> (B, L, H*D) and back
        return t.permute(0, 2, 1, 3).reshape(b, length, h * d)

    def heads(t):
        return t.reshape(b, t.shape[1], h, d).permute(0, 2, 1, 3)

    k = heads(merge_span(tokens(key), plan, start))
    v = heads(merge_span(tokens(value), plan, start))
    n, m = plan.n_tokens, plan.n_groups
    bias = torch.zeros(length - n + m, dtype=key.dtype, device=key.device)
    bias[start : start + m] = plan.size[0].log().to(key.dtype)
    bias = bias.view(1, 1, 1, -1)
    if mask is None:
        return k, v, bias
    if mask.shape[-1] != 1:  # a mask over keys follows them; a broadcast one stays
        mask = gather_span(mask, plan, start, dim=mask.ndim - 1)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=key.dtype, device=key.device).masked_fill_(~mask, float("-inf"))
    return k, v, mask.to(key.dtype) + bias


# Per-family defaults (docs/benchmarks.md, "Diffusion transformers"): the mode, and how many blocks
# at each end of the network stay unmerged. Block mode is the only mode that is faster on every
# family (about 2x per block at ratio 0.5 on CPU); no block is skipped (on the measuring instrument
# skipping only trades speed for error in proportion). Video families: the same rule (measured at
# their default clips: Wan2.1-1.3B 2.09x, LTX-Video 2.22x, HunyuanVideo at depth 4 1.84x).
DIT_DEFAULTS = {
    "flux": ("block", 0),
    "flux2": ("block", 0),
    "sd3": ("block", 0),
    "qwen-image": ("block", 0),
    "z-image": ("block", 0),
    "pixart": ("block", 0),
    "wan": ("block", 0),
    "hunyuan-video": ("block", 0),
    "ltx-video": ("block", 0),
}


def dit_settings(family: str, mode: str, skip_ends) -> Tuple[str, int]:
    """(mode, skip_ends) for a family: "auto" and None take the family's measured defaults."""
    default_mode, default_skip = DIT_DEFAULTS[family]
    return (default_mode if mode == "auto" else mode), (default_skip if skip_ends is None else skip_ends)


def merged_blocks(n_blocks: int, skip_ends: int) -> range:
    """Indices (in execution order) of the blocks that merge: all but skip_ends at each end.

    Raises OptionError (at patch time, in every adapter) when skip_ends > 0 leaves no block to
    merge: the patch would run the model unchanged while the caller asked for merging."""
    if skip_ends > 0 and n_blocks > 0 and 2 * skip_ends >= n_blocks:
        raise OptionError(
            f"skip_ends={skip_ends} leaves no block to merge: this model has {n_blocks} blocks, so skip_ends must "
            f"be in [0, {(n_blocks - 1) // 2}] (blocks kept unmerged at each end); lower it or pass None for the default"
        )
    return range(min(skip_ends, n_blocks), max(n_blocks - skip_ends, 0))
