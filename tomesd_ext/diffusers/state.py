"""Per-model and per-block runtime state of a patched denoiser (no tensors kept between calls)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core import MergePlan, PlanCache, ToMeOptions, level_plan, timestep_key, tome_plan

__all__ = ["BlockSlot", "ModelState", "timestep_key"]


class ModelState:
    """What the denoiser's forward pre-hook records for the blocks of one call."""

    def __init__(self, opts: ToMeOptions, max_downsample: int):
        self.opts = opts
        self.max_downsample = max_downsample
        self.latent_hw: Optional[Tuple[int, int]] = None
        self.step_key: float = 0.0
        # (metric, h, w, opts, seed) -> plan: the destination-selection policy of this patch
        # (ToMe windows; importance mode installs ImportanceTracker.plan)
        self.planner = tome_plan
        self.cache: Optional[PlanCache] = PlanCache(opts.reuse_steps) if opts.reuses_plans else None
        self._slots = 0

    def new_slot_id(self) -> int:
        self._slots += 1
        return self._slots

    def begin_call(self, latent_hw: Optional[Tuple[int, int]], step_key: float) -> None:
        """Called by the denoiser's forward pre-hook before the blocks run."""
        self.latent_hw = latent_hw
        self.step_key = step_key
        if self.cache is not None:
            self.cache.begin_call(step_key)

    def plan_for(self, x: torch.Tensor, slot_id: int = 0) -> Optional[MergePlan]:
        """The merge plan for metric x: (B, N, C), or None if this level is not merged.

        One partition per (step, level): every block of a level draws the same destinations in a
        step (matching stays per block), so a ComfyUI adapter keyed the same way agrees exactly.
        With plan reuse (options reuse / reuse_steps) the plan comes from the PlanCache, keyed by
        level (reuse="level") or by block (slot_id) and by batch and device.
        """
        scope = None if self.opts.reuse == "level" else slot_id
        return level_plan(
            x, self.latent_hw, self.step_key, self.opts, self.max_downsample, self.cache, scope, self.planner
        )


class BlockSlot:
    """The plan of the block call in progress, shared by the operators wrapped in that block.

    The first wrapped operator computes it from its own (normed) input, e.g. norm1(x) for attn1:
    the tensor ComfyUI's attn1_patch sees too, so both adapters match on the same metric.
    """

    __slots__ = ("state", "plan", "ready", "ff_merged", "slot_id")

    def __init__(self, state: ModelState):
        self.state = state
        self.slot_id = state.new_slot_id()
        self.reset()

    def reset(self):
        self.plan: Optional[MergePlan] = None
        self.ready = False
        self.ff_merged = False

    def get(self, metric: torch.Tensor) -> Optional[MergePlan]:
        if not self.ready:
            self.plan = self.state.plan_for(metric, self.slot_id)
            self.ready = True
        return self.plan
