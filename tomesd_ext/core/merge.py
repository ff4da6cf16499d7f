"""Apply a MergePlan: merge = size-weighted mean per group (or the representative's value for a
replace plan), unmerge = copy the group's value back to its members."""

from __future__ import annotations

from typing import Optional

import torch

from .. import kernels
from .plan import MergePlan


def merge(x: torch.Tensor, plan: MergePlan, token_size: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: (B, N, C) -> (B, M, C). token_size: (B, N) weights of already-merged tokens (None = 1).

    A batch that is a multiple of the plan's batch (e.g. the plan computed on one half) reuses it.
    Without token_size, a replace plan gathers its representatives and a prune plan applies its
    own weights.
    """
    if token_size is None and plan.rep is not None:
        return _gather(x, plan.rep)
    group, size = _fit(plan.group, x.shape[0]), _fit(plan.size, x.shape[0])
    if token_size is None and plan.weight is not None:
        token_size = plan.weight.repeat(x.shape[0] // plan.batch, 1)
    if token_size is not None:
        size = torch.zeros_like(size).scatter_add_(1, group, token_size.float())
    return kernels.merge_mean(x, group, size, token_size)


def unmerge(y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """y: (B, M, C) -> (B, N, C): every token receives its group's value."""
    return _gather(y, plan.group)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, M, C) gathered along tokens at index (P, N) -> (B, N, C); P is 1 or divides B."""
    if index.shape[0] == 1 and x.shape[0] > 1:
        return x.index_select(1, index[0])
    return kernels.unmerge_gather(x, _fit(index, x.shape[0]))


def _fit(t: torch.Tensor, batch: int) -> torch.Tensor:
    if batch == t.shape[0]:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"batch {batch} is not a multiple of the plan's batch {t.shape[0]}")
    return t.repeat(batch // t.shape[0], 1)
