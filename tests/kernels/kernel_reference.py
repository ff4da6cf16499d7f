"""Slow loop-based references of the kernels (float64), shared by the CPU and GPU tests."""

from __future__ import annotations

import torch


def ref_best_match(src, dst, groups=1, reduce="max"):
    """Loops over samples/rows: (score (b, S) float64, index (b, S)); ties -> lowest index."""
    src, dst = src.double(), dst.double()
    B, S, _ = src.shape
    D = dst.shape[1]
    b = B // groups
    score = torch.empty(b, S, dtype=torch.float64)
    index = torch.empty(b, S, dtype=torch.long)
    for j in range(b):
        for s in range(S):
            best, best_d = None, None
            for d in range(D):
                vals = [float(src[g * b + j, s] @ dst[g * b + j, d]) for g in range(groups)]
                v = max(vals) if reduce == "max" else sum(vals) / groups
                if best is None or v > best:
                    best, best_d = v, d
            score[j, s], index[j, s] = best, best_d
    return score, index


def ref_merge(x, group, size, weight=None):
    B, N, C = x.shape
    M = size.shape[1]
    out = torch.zeros(B, M, C, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            w = 1.0 if weight is None else float(weight[b, n])
            out[b, group[b, n]] += x[b, n].double() * w
        out[b] /= size[b].double().unsqueeze(-1)
    return out


def ref_unmerge(y, group):
    B, N = group.shape
    out = torch.empty(B, N, y.shape[-1], dtype=y.dtype)
    for b in range(B):
        for n in range(N):
            out[b, n] = y[b, group[b, n]]
    return out


def random_plan_groups(B, N, M, gen):
    """A (B, N) group tensor in which every group in [0, M) has at least one member."""
    groups = []
    for _ in range(B):
        g = torch.cat([torch.arange(M), torch.randint(M, (N - M,), generator=gen)])
        groups.append(g[torch.randperm(N, generator=gen)])
    return torch.stack(groups)


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)
