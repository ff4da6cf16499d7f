"""Tokens sorted by group (CSR), computed once per plan and cached for the CUDA merge kernel.

order: (B, N) token indices sorted by group (stable: members in ascending token order);
offsets: (B, M + 1) so group m of sample b owns order[b, offsets[b, m] : offsets[b, m + 1]].
The cache is keyed by the group tensor's identity and version (weak reference: an entry dies
with its plan), so every operator of a block, and every block reusing a plan, sorts once.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Tuple

import torch

_CACHE: "OrderedDict[int, tuple]" = OrderedDict()
_CACHE_SIZE = 16


def build_csr(group: torch.Tensor, n_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets) of a (B, N) group tensor with values in [0, n_groups)."""
    sorted_group, order = torch.sort(group, dim=1, stable=True)
    bounds = torch.arange(n_groups + 1, device=group.device, dtype=group.dtype)
    offsets = torch.searchsorted(sorted_group.contiguous(), bounds.expand(group.shape[0], -1).contiguous())
    return order.contiguous(), offsets.contiguous()


def group_csr(group: torch.Tensor, n_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cached build_csr: the same (unmodified) group tensor is sorted only once."""
    key = id(group)
    hit = _CACHE.get(key)
    if hit is not None:
        ref, version, m, csr = hit
        if ref() is group and version == group._version and m == n_groups:
            _CACHE.move_to_end(key)
            return csr
    csr = build_csr(group, n_groups)
    _CACHE[key] = (weakref.ref(group), group._version, n_groups, csr)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return csr


def clear() -> None:
    _CACHE.clear()
