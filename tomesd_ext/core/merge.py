"""Apply a MergePlan: merge = size-weighted mean per group, unmerge = copy back to members."""

from __future__ import annotations

from typing import Optional

import torch

from .. import kernels
from .plan import MergePlan


def merge(x: torch.Tensor, plan: MergePlan, token_size: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: (B, N, C) -> (B, M, C). token_size: (B, N) weights of already-merged tokens (None = 1).

    A batch that is a multiple of the plan's batch (e.g. the plan computed on one half) reuses it.
    Without token_size, the plan's own weights (prune plans) apply when it has them.
    """
    group, size = _fit(plan, x.shape[0])
    if token_size is None and plan.weight is not None:
        token_size = plan.weight.repeat(x.shape[0] // plan.batch, 1)
    if token_size is not None:
        size = torch.zeros_like(size).scatter_add_(1, group, token_size.float())
    return kernels.merge_mean(x, group, size, token_size)


def unmerge(y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """y: (B, M, C) -> (B, N, C): every token receives its group's value."""
    group, _ = _fit(plan, y.shape[0])
    return kernels.unmerge_gather(y, group)


def _fit(plan: MergePlan, batch: int):
    if batch == plan.batch:
        return plan.group, plan.size
    if batch % plan.batch:
        raise ValueError(f"batch {batch} is not a multiple of the plan's batch {plan.batch}")
    k = batch // plan.batch
    return plan.group.repeat(k, 1), plan.size.repeat(k, 1)
