"""VidToMe temporal token merging (Li, Ma, Yang & Yang, "VidToMe", CVPR 2024).

Pure tensor functions. The frames of a video are denoised in chunks (one UNet call per chunk,
batch S*F sample-major for S CFG samples and F frames). In every self-attention of the merged
levels, the tokens of a chunk's frames are joined, the other frames' tokens are merged into one
random target frame ("replace" merge: a merged token takes its destination's value), then merged
with a global token set carried across the chunks of one step; attention runs on the merged
tokens and the output is copied back to every frame (unmerge by copy).

Shapes: x (S*F, N, C) with N = h*w tokens of one frame; joined (S, F*N, C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .. import kernels
from .grid import level_grid
from .matching import normalize_metric
from .partition import derive_seed
from .plan import MergePlan
from .temporal_options import VidToMeOptions


def _generator(*keys) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(*keys))


def chunk_frames(n_frames: int, chunk_size: int, seed: int, step_key=0) -> List[List[int]]:
    """Split frames 0..n_frames-1 into chunks of consecutive frames, in the order to run them.

    The first chunk has a random length in [1, chunk_size] (so chunk seams move every step), the
    rest have chunk_size frames (the last may be shorter); with probability 1/2 the borders are
    mirrored (the short chunk at the end); chunks run in a random order. Seeded by (seed, step).
    Every frame appears in exactly one chunk.
    """
    if n_frames <= 0:
        return []
    gen = _generator(seed, "chunks", step_key)
    first = int(torch.randint(1, chunk_size + 1, (1,), generator=gen))
    sizes = [min(first, n_frames)]
    while sum(sizes) < n_frames:
        sizes.append(min(chunk_size, n_frames - sum(sizes)))
    if int(torch.randint(2, (1,), generator=gen)):
        sizes.reverse()
    chunks, start = [], 0
    for size in sizes:
        chunks.append(list(range(start, start + size)))
        start += size
    order = torch.randperm(len(chunks), generator=gen).tolist()
    return [chunks[i] for i in order]


@dataclass(frozen=True)
class ChunkDraw:
    """The random choices of one chunk in one step, shared by every merged block of the call."""

    target: int  # target frame of the local merge, in [0, F)
    global_is_src: bool  # global set = source side of the global merge (else the local tokens)


def chunk_draw(seed: int, step_key, frames: Tuple[int, ...], global_rand: float) -> ChunkDraw:
    """One seeded draw per (seed, step, chunk frames)."""
    gen = _generator(seed, "draw", step_key, tuple(frames))
    target = int(torch.randint(len(frames), (1,), generator=gen))
    global_is_src = bool(torch.rand((1,), generator=gen).item() < global_rand)
    return ChunkDraw(target, global_is_src)


@dataclass
class ReplacePlan:
    """A "replace" merge as data: every group takes the value of one representative token.

    rep: (P, M) long, the representative token of each group (destinations, then kept sources);
    group: (P, N) long, the group of every token; P is 1 (one map shared by all samples) or the
    batch. merge(x) = x gathered at rep; unmerge(y) = y gathered at group (copy back).
    Equals core.merge(x, plan, token_size) with weight 1 for representatives and 0 for merged
    sources (see as_merge_plan / replace_weights).
    """

    rep: torch.Tensor
    group: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return self.group.shape[1]

    @property
    def n_groups(self) -> int:
        return self.rep.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> (B, M, C)."""
        return _gather_rows(x, self.rep)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B, M, C) -> (B, N, C)."""
        return _gather_rows(y, self.group)

    def as_merge_plan(self) -> MergePlan:
        """The same merge as a core MergePlan (group sizes = members per group)."""
        P, M = self.rep.shape
        size = torch.zeros(P, M, device=self.group.device).scatter_add_(
            1, self.group, torch.ones(self.group.shape, device=self.group.device)
        )
        return MergePlan(self.group, size, self.n_tokens)

    def replace_weights(self) -> torch.Tensor:
        """(P, N) token weights: 1 for representatives, 0 for merged sources."""
        w = torch.zeros(self.group.shape, device=self.group.device)
        return w.scatter_(1, self.rep, 1.0)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if index.shape[0] == 1:
        return x.index_select(1, index[0])
    if x.shape[0] != index.shape[0]:
        raise ValueError(f"batch {x.shape[0]} does not match the plan's batch {index.shape[0]}")
    return kernels.unmerge_gather(x, index)


def replace_plan(
    metric: torch.Tensor, dst_idx: torch.Tensor, src_idx: torch.Tensor, r: int, align_batch: bool = True
) -> ReplacePlan:
    """Match each source to its most similar destination (cosine); the r best sources merge.

    metric: (S, N, C); dst_idx (D,), src_idx (Ns,) disjoint raster indices covering [0, N).
    align_batch: one map for all S samples (VidToMe's align_batch: each source takes its best
    destination over all samples, ranked by that best score), else one map per sample.
    """
    if not 0 <= r <= src_idx.numel():
        raise ValueError(f"r={r} must be in [0, {src_idx.numel()}] (number of sources)")
    m = normalize_metric(metric)
    score, target = kernels.best_match(m[:, src_idx], m[:, dst_idx])  # (S, Ns)
    return _plan_from_matches(score, target, dst_idx, src_idx, r, metric.shape[1], align_batch)


def _plan_from_matches(score, target, dst_idx, src_idx, r, n_tokens, align_batch) -> ReplacePlan:
    """score, target: (S, Ns) best similarity and destination position (in dst_idx) per source."""
    D, Ns = dst_idx.numel(), src_idx.numel()
    device = score.device
    if align_batch and score.shape[0] > 1:
        score, which = score.max(dim=0, keepdim=True)
        target = target.gather(0, which)
    P = score.shape[0]
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    merged, kept = order[:, :r], order[:, r:]
    src_full = src_idx.expand(P, Ns)
    kept_idx = src_full.gather(1, kept)
    rep = torch.cat([dst_idx.expand(P, D), kept_idx], dim=1)
    group = torch.empty(P, n_tokens, dtype=torch.long, device=device)
    group[:, dst_idx] = torch.arange(D, device=device)
    group.scatter_(1, kept_idx, torch.arange(D, D + Ns - r, device=device).expand(P, Ns - r))
    group.scatter_(1, src_full.gather(1, merged), target.gather(1, merged))
    return ReplacePlan(rep, group)


def local_plan(joined: torch.Tensor, n_frames: int, target: int, ratio: float, align_batch: bool = True) -> ReplacePlan:
    """Local merge of one chunk: other frames' tokens into the target frame.

    joined: (S, F*N, C) frames joined along tokens; r = floor(ratio * (F-1) * N).
    """
    S, FN, _ = joined.shape
    n = FN // n_frames
    device = joined.device
    lo, hi = target * n, (target + 1) * n
    dst = torch.arange(lo, hi, device=device)
    src = torch.cat([torch.arange(0, lo, device=device), torch.arange(hi, FN, device=device)])
    r = int(ratio * src.numel())
    # normalise once and match the frames before / after the target as views (no gathers)
    m = normalize_metric(joined)
    parts = [kernels.best_match(m[:, a:b], m[:, lo:hi]) for a, b in ((0, lo), (hi, FN)) if b > a]
    score = torch.cat([p[0] for p in parts], 1)
    tgt = torch.cat([p[1] for p in parts], 1)
    return _plan_from_matches(score, tgt, dst, src, r, FN, align_batch)


def global_plan(local: torch.Tensor, glob: torch.Tensor, ratio: float, global_is_src: bool, align_batch: bool = True) -> ReplacePlan:
    """Global merge of the chunk's local tokens (S, Ml, C) with the carried set (S, Mg, C).

    Acts on cat([local, glob], 1); r = floor(ratio * |source side|).
    """
    ml, mg = local.shape[1], glob.shape[1]
    device = local.device
    local_idx = torch.arange(ml, device=device)
    glob_idx = torch.arange(ml, ml + mg, device=device)
    src, dst = (glob_idx, local_idx) if global_is_src else (local_idx, glob_idx)
    r = int(ratio * src.numel())
    return replace_plan(torch.cat([local, glob], 1), dst, src, r, align_batch)


def temporal_attention(
    x: torch.Tensor,
    n_samples: int,
    attn: Callable[[torch.Tensor], torch.Tensor],
    opts: VidToMeOptions,
    draw: ChunkDraw,
    global_tokens: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Self-attention `attn` of one chunk with VidToMe merging.

    x: (S*F, N, C) sample-major (sample s holds rows s*F .. s*F+F-1); attn: (S, M, C) -> (S, M, C).
    global_tokens: the set carried from earlier chunks of this step, (S, Mg, C), or None.
    Returns (out (S*F, N, C), the new global set (S, Ml, C) or None when global_ratio is 0).
    """
    B, N, C = x.shape
    if n_samples <= 0 or B % n_samples:
        raise ValueError(f"batch {B} is not a multiple of the number of samples {n_samples}")
    S, F = n_samples, B // n_samples
    if not 0 <= draw.target < F:
        raise ValueError(f"target frame {draw.target} is outside the chunk's {F} frames")
    joined = x.reshape(S, F * N, C)
    local = local_plan(joined, F, draw.target, opts.local_ratio, opts.align_batch) if F > 1 else None
    tokens = local.merge(joined) if local is not None else joined
    use_global = opts.global_ratio > 0 and global_tokens is not None and global_tokens.shape[0] == S
    if use_global:
        gplan = global_plan(tokens, global_tokens, opts.global_ratio, draw.global_is_src, opts.align_batch)
        merged = gplan.merge(torch.cat([tokens, global_tokens.to(tokens.dtype)], 1))
        ml = tokens.shape[1]
        local_part = ReplacePlan(gplan.rep, gplan.group[:, :ml])  # unmerge only the local tokens
        new_global = local_part.unmerge(merged)
        out = local_part.unmerge(attn(merged))
    else:
        new_global = tokens if opts.global_ratio > 0 else None
        out = attn(tokens)
    if local is not None:
        out = local.unmerge(out)
    return out.reshape(B, N, out.shape[-1]), new_global


def merges_level(n_tokens: int, latent_hw: Optional[Tuple[int, int]], max_downsample: int) -> bool:
    """True when a self-attention over n_tokens runs at a merged level of a latent of latent_hw
    (downsample factor <= max_downsample); False for an unknown level or latent size."""
    found = level_grid(n_tokens, latent_hw) if latent_hw is not None else None
    return found is not None and found[0] <= max_downsample


def chunked_temporal_attention(
    x: torch.Tensor,
    n_samples: int,
    attn: Callable[[torch.Tensor], torch.Tensor],
    opts: VidToMeOptions,
    step_key,
) -> torch.Tensor:
    """Self-attention over every frame of a video at once, chunk by chunk, with VidToMe merging.

    x: (S*F, N, C) sample-major (sample s holds its F frames in rows s*F .. s*F+F-1).
    The frames are split by ``chunk_frames(F, opts.chunk_size, opts.seed, step_key)``; the chunks
    run in that order through ``temporal_attention`` with one ``chunk_draw`` each, the global set
    carried from chunk to chunk. This equals running the UNet once per chunk (as the video
    pipeline does with the diffusers adapter): outside this attention a UNet mixes nothing
    across frames, so block b of a chunk sees the same global set either way.
    Returns (S*F, N, C') in the rows of x.
    """
    B = x.shape[0]
    if n_samples <= 0 or B % n_samples:
        raise ValueError(f"batch {B} is not a multiple of the number of samples {n_samples}")
    S, F = n_samples, B // n_samples
    out, global_tokens = None, None
    for frames in chunk_frames(F, opts.chunk_size, opts.seed, step_key):
        rows = torch.tensor([s * F + f for s in range(S) for f in frames], device=x.device)
        draw = chunk_draw(opts.seed, step_key, tuple(frames), opts.global_rand)
        y, global_tokens = temporal_attention(x.index_select(0, rows), S, attn, opts, draw, global_tokens)
        if out is None:
            out = y.new_empty((B,) + tuple(y.shape[1:]))
        out[rows] = y
    return out
