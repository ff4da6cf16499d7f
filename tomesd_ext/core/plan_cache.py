"""Reuse of merge plans across the blocks of a level and across consecutive denoising steps.

Similarity between tokens changes little from one transformer block to the next of the same
level, and from one step to the next (ToMe-SD's partition is already shared per step); reusing
the plan removes the matching (an O(N^2 C) GEMM plus a sort) from every block but the first.

Semantics (PlanCache, driven by the adapter):
- `begin_call(step_key)` once per denoiser call; a step key larger than the previous one (the
  timestep went up) starts a new sampling run and drops every plan;
- `get(key, compute)` returns the plan stored under `key` if it is still valid, else computes,
  stores and returns it. An entry is valid in the call that made it; with steps = k > 1 also in
  the calls of the next k - 1 distinct step keys.
Keys are chosen by the caller, e.g. (None, h, w, batch, device) for one plan per level or
(block id, h, w, batch, device) for one plan per block.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, Optional, Tuple

from .plan import MergePlan

MAX_ENTRIES = 64


class PlanCache:
    """Merge plans kept for the rest of a denoiser call (and optionally `steps` - 1 more steps)."""

    def __init__(self, steps: int = 1):
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.steps = steps
        self.call = 0
        self.step = 0
        self._last_key: Optional[float] = None
        self._entries: Dict[Hashable, Tuple[int, int, Optional[MergePlan]]] = {}
        self.computed = 0  # plans computed (for tests and benchmarks)
        self.reused = 0

    def begin_call(self, step_key: float) -> None:
        self.call += 1
        if step_key != self._last_key:
            if self._last_key is not None and step_key > self._last_key:
                self._entries.clear()  # timesteps go down while sampling: this is a new run
            self.step += 1
            self._last_key = step_key

    def _valid(self, call: int, step: int) -> bool:
        if call == self.call:
            return True
        return self.steps > 1 and self.step - step < self.steps

    def get(self, key: Hashable, compute: Callable[[], Optional[MergePlan]]) -> Optional[MergePlan]:
        hit = self._entries.get(key)
        if hit is not None and self._valid(hit[0], hit[1]):
            self.reused += 1
            return hit[2]
        plan = compute()
        self.computed += 1
        self._entries.pop(key, None)
        self._entries[key] = (self.call, self.step, plan)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.pop(next(iter(self._entries)))
        return plan

    def clear(self) -> None:
        self._entries.clear()
