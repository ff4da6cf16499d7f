"""Bipartite soft matching (ToMe, Bolya et al. 2023; ToMe-SD sec. 3) -> MergePlan.

Each source token finds its most similar destination (cosine similarity of the metric);
the r sources with the highest similarity merge into their destination, the rest stay. On a
video grid the search may be limited to destinations at most ``frame_reach`` frames away.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import kernels
from ..kernels import torch_ops
from .plan import MergePlan

EPS = 1e-6


def normalize_metric(metric: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows (in float32, with epsilon: zero rows stay zero instead of NaN).

    The result is float32 on CPU; on CUDA it is cast back to the input dtype so the score GEMM
    uses tensor cores (ranking is then done in float32).
    """
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(EPS)
    if metric.is_cuda:
        m = m.to(metric.dtype)
    return m


def clip_metric(metric: torch.Tensor, frames: int) -> torch.Tensor:
    """The matching metric of whole clips: metric (B*frames, N, C), rows b*frames .. b*frames +
    frames - 1 the frames of clip b -> (B, N, C), the mean over each clip's frames of the
    L2-normalised tokens (one plan per clip then merges the same groups in every frame)."""
    rows, n, c = metric.shape
    if rows % frames:
        raise ValueError(f"metric has {rows} rows, not a whole number of {frames}-frame clips")
    m = normalize_metric(metric)
    return m.float().view(rows // frames, frames, n, c).mean(dim=1).to(m.dtype)


def bipartite_plan(
    metric: torch.Tensor,
    dst_idx: torch.Tensor,
    src_idx: torch.Tensor,
    r: int,
    priority: Optional[torch.Tensor] = None,
    grid: Optional[Tuple[int, ...]] = None,
    frame_reach: Optional[int] = None,
) -> MergePlan:
    """Match sources to destinations and merge the r best sources.

    metric: (B, N, C); dst_idx: (D,), src_idx: (S,) raster indices (shared by the batch, so the
    cond/uncond halves of a CFG batch share one partition); r <= S.
    priority: optional (B, S) key added to the similarity before ranking (a larger key merges
    first), e.g. a large constant for unimportant tokens (importance-based merging).
    frame_reach: on a video grid (frames, h, w), a source only matches destinations at most this
    many frames away (0: its own frame); None: any destination. Every source must have one in
    reach (the window partition guarantees it for frame_reach >= st - 1).
    Returns a plan with groups [destinations (D) | kept sources (S - r), by descending score].
    """
    S = src_idx.numel()
    if not 0 <= r <= S:
        raise ValueError(f"r={r} must be in [0, {S}] (number of sources)")
    m = normalize_metric(metric)
    if frame_reach is None:
        score, target = kernels.best_match(m[:, src_idx], m[:, dst_idx])
    else:
        if grid is None or len(grid) != 3:
            raise ValueError(f"frame_reach={frame_reach} needs a (frames, h, w) grid, got {grid}")
        per_frame = grid[1] * grid[2]
        score, target = best_match_near(m[:, src_idx], m[:, dst_idx], src_idx // per_frame, dst_idx // per_frame, frame_reach)
    if priority is not None:
        score = score + priority
    return plan_from_matches(score, target, dst_idx, src_idx, r, metric.shape[1], grid)


def best_match_near(
    src: torch.Tensor, dst: torch.Tensor, src_frame: torch.Tensor, dst_frame: torch.Tensor, reach: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per source row, the best destination among those at most ``reach`` frames away.

    src: (B, S, C), dst: (B, D, C) L2-normalised; src_frame (S,), dst_frame (D,) their frame
    numbers -> (score (B, S) float32, index (B, S) long); ties resolve to the lowest index. A
    source with no destination in reach gets score -inf. The torch matcher on every device (no
    CUDA kernel), its score rows chunked.
    """
    return torch_ops.best_match(src, dst, lambda a, b: (src_frame[a:b, None] - dst_frame[None, :]).abs() > reach)


def plan_from_matches(
    score: torch.Tensor,
    target: torch.Tensor,
    dst_idx: torch.Tensor,
    src_idx: torch.Tensor,
    r: int,
    n_tokens: int,
    grid: Optional[Tuple[int, int]] = None,
    replace: bool = False,
) -> MergePlan:
    """The plan of a bipartite match: the r sources with the highest score merge into their target.

    score, target: (P, S) ranking key and best destination (a position in dst_idx) of every
    source; dst_idx (D,), src_idx (S,) disjoint raster indices of the n_tokens. Groups are
    [destinations (D) | kept sources (S - r), by descending score]; sizes count the members.
    replace: also record each group's representative token (MergePlan.rep), so merging copies the
    destination's value instead of averaging (VidToMe). Every plan records its anchors (the
    destination, or the kept token itself) in MergePlan.anchor.
    """
    P, D, S = score.shape[0], dst_idx.numel(), src_idx.numel()
    device = score.device
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    merged, kept = order[:, :r], order[:, r:]
    src_full = src_idx.expand(P, S)
    kept_idx = src_full.gather(1, kept)
    group = torch.empty(P, n_tokens, dtype=torch.long, device=device)
    group[:, dst_idx] = torch.arange(D, device=device)
    group.scatter_(1, kept_idx, torch.arange(D, D + S - r, device=device).expand(P, S - r))
    merged_target = target.gather(1, merged)
    group.scatter_(1, src_full.gather(1, merged), merged_target)
    size = torch.ones(P, D + S - r, device=device)
    size[:, :D].scatter_add_(1, merged_target, torch.ones(P, r, device=device))
    anchor = torch.cat([dst_idx.expand(P, D), kept_idx], dim=1)
    return MergePlan(group, size, n_tokens, grid, rep=anchor if replace else None, anchor=anchor)
