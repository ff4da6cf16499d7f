"""MergePlan: a token merge as data (indices and group sizes), composable and reusable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass
class MergePlan:
    """Maps N tokens to M = N - r groups, per sample.

    group: (B, N) long, the group in [0, M) each token belongs to;
    size:  (B, M) float32, tokens per group (counting earlier merges when composed);
    n_tokens: N; grid: (h, w) of the token grid the plan was computed on, if any;
    weight: optional (B, N) float32 token weights merge() uses when it is given none: 0 for a
        source that is dropped instead of averaged ("prune" merges, importance mode).
    rep: optional (B, M) long, the representative token of each group when every group takes
        that token's value instead of a mean ("replace" merges, VidToMe): merge() gathers x at
        rep, which equals the weighted mean with weight 1 for representatives and 0 otherwise.
    anchor: optional (B, M) long, the token whose position each group carries (its destination,
        or the kept token itself); positional tables follow merged tokens through it (core/dit.py).
    B may be 1 for a plan shared by every sample of a batch.
    """

    group: torch.Tensor
    size: torch.Tensor
    n_tokens: int
    grid: Optional[Tuple[int, int]] = None
    weight: Optional[torch.Tensor] = None
    rep: Optional[torch.Tensor] = None
    anchor: Optional[torch.Tensor] = None

    @property
    def n_groups(self) -> int:
        return self.size.shape[1]

    @property
    def batch(self) -> int:
        return self.group.shape[0]

    def compose(self, after: "MergePlan") -> "MergePlan":
        """Plan of applying self then `after` (which acts on self's M groups)."""
        if any(p.weight is not None or p.rep is not None for p in (self, after)):
            raise ValueError("prune and replace plans do not compose")
        group = after.group.gather(1, self.group)
        size = torch.zeros_like(after.size).scatter_add_(1, after.group, self.size)
        return MergePlan(group, size, self.n_tokens, self.grid)

    def replace_weights(self) -> torch.Tensor:
        """(B, N) token weights of a replace plan: 1 for representatives, 0 for merged tokens."""
        if self.rep is None:
            raise ValueError("replace_weights needs a replace plan (rep set)")
        return torch.zeros(self.group.shape, device=self.group.device).scatter_(1, self.rep, 1.0)

    def repeat_rows(self, times: int) -> "MergePlan":
        """The plan with every row repeated ``times`` times in place (row b -> rows b*times ..
        b*times + times - 1): one plan per clip given to each of its frames."""
        if times == 1:
            return self

        def rows(t):
            return None if t is None else t.repeat_interleave(times, dim=0)

        return MergePlan(rows(self.group), rows(self.size), self.n_tokens, self.grid, rows(self.weight),
                         rows(self.rep), rows(self.anchor))

    @staticmethod
    def identity(batch: int, n_tokens: int, device=None, grid=None) -> "MergePlan":
        group = torch.arange(n_tokens, device=device).expand(batch, n_tokens).contiguous()
        size = torch.ones(batch, n_tokens, device=device)
        return MergePlan(group, size, n_tokens, grid)
