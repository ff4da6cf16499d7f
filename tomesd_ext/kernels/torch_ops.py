"""Exact pure-torch implementations of the merge kernels (the reference the CUDA path must match)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

# Score-matrix chunk budget: rows of the (B, S, D) similarity matrix are processed in chunks so
# that no more than this many bytes of scores exist at once (memory O(N) in the number of rows).
SCORE_CHUNK_BYTES = 64 * 2**20


def best_match(src: torch.Tensor, dst: torch.Tensor, excluded=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per source row, the best destination by dot product.

    src: (B, S, C), dst: (B, D, C), both L2-normalised -> (score (B, S) float32, index (B, S) long).
    Ties resolve to the lowest destination index. excluded: optional ``(start, stop) -> (stop -
    start, D) bool`` naming the pairs a chunk of source rows may not match (score -inf there).
    """
    B, S, _ = src.shape
    D = dst.shape[1]
    dst_t = dst.transpose(1, 2)
    rows = max(1, SCORE_CHUNK_BYTES // max(1, B * D * src.element_size()))

    def chunk(start, stop):
        sim = torch.bmm(src[:, start:stop], dst_t)
        if excluded is None:
            score, index = sim.max(dim=-1)
            return score.float(), index
        return sim.float().masked_fill_(excluded(start, stop), float("-inf")).max(dim=-1)

    if rows >= S:
        return chunk(0, S)
    parts = [chunk(start, min(start + rows, S)) for start in range(0, S, rows)]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def best_match_aligned(
    src: torch.Tensor, dst: torch.Tensor, groups: int, reduce: str = "max"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One matching shared by `groups` batch slices (VidToMe align_batch).

    src: (G*b, S, C), dst: (G*b, D, C) -> (score, index) (b, S); the score of (s, d) for sample j
    is the max (reduce="max") or mean over g of <src[g*b + j, s], dst[g*b + j, d]>, computed in
    float32. Ties resolve to the lowest destination index. Rows are chunked as in best_match.
    """
    B, S, _ = src.shape
    D = dst.shape[1]
    b = B // groups
    dst_t = dst.transpose(1, 2)
    rows = max(1, SCORE_CHUNK_BYTES // max(1, B * D * 4))
    scores, indices = [], []
    for start in range(0, S, rows):
        s = torch.bmm(src[:, start : start + rows], dst_t).float().view(groups, b, -1, D)
        s = s.amax(0) if reduce == "max" else s.mean(0)
        v, i = s.max(dim=-1)
        scores.append(v)
        indices.append(i)
    if not scores:
        return src.new_zeros(b, 0, dtype=torch.float32), torch.zeros(b, 0, dtype=torch.long, device=src.device)
    return torch.cat(scores, 1), torch.cat(indices, 1)


def merge_mean(
    x: torch.Tensor, group: torch.Tensor, size: torch.Tensor, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Size-weighted mean of the tokens of each group.

    x: (B, N, C); group: (B, N) in [0, M); size: (B, M) total weight per group;
    weight: (B, N) weight per token (None = 1) -> (B, M, C) in x.dtype.
    Accumulates in float32 for fp16/bf16 inputs.
    """
    B, N, C = x.shape
    M = size.shape[1]
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xs = x.to(acc_dtype)
    if weight is not None:
        xs = xs * weight.to(acc_dtype).unsqueeze(-1)
    out = torch.zeros(B, M, C, dtype=acc_dtype, device=x.device)
    out.scatter_add_(1, group.unsqueeze(-1).expand(B, N, C), xs)
    out /= size.to(acc_dtype).unsqueeze(-1)
    return out.to(x.dtype)


def unmerge_gather(y: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Copy each group's value back to every member. y: (B, M, C), group: (B, N) -> (B, N, C)."""
    B, N = group.shape
    return y.gather(1, group.unsqueeze(-1).expand(B, N, y.shape[-1]))
