"""Per-model and per-block runtime state of a patched denoiser (no tensors kept between calls)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core import MergePlan, ToMeOptions, level_plan, timestep_key

__all__ = ["BlockSlot", "ModelState", "timestep_key"]


class ModelState:
    """What the denoiser's forward pre-hook records for the blocks of one call."""

    def __init__(self, opts: ToMeOptions, max_downsample: int):
        self.opts = opts
        self.max_downsample = max_downsample
        self.latent_hw: Optional[Tuple[int, int]] = None
        self.step_key: float = 0.0

    def plan_for(self, x: torch.Tensor) -> Optional[MergePlan]:
        """The merge plan for metric x: (B, N, C), or None if this level is not merged.

        One partition per (step, level): every block of a level draws the same destinations in a
        step (matching stays per block), so a ComfyUI adapter keyed the same way agrees exactly.
        """
        return level_plan(x, self.latent_hw, self.step_key, self.opts, self.max_downsample)


class BlockSlot:
    """The plan of the block call in progress, shared by the operators wrapped in that block.

    The first wrapped operator computes it from its own (normed) input, e.g. norm1(x) for attn1:
    the tensor ComfyUI's attn1_patch sees too, so both adapters match on the same metric.
    """

    __slots__ = ("state", "plan", "ready", "ff_merged")

    def __init__(self, state: ModelState):
        self.state = state
        self.reset()

    def reset(self):
        self.plan: Optional[MergePlan] = None
        self.ready = False
        self.ff_merged = False

    def get(self, metric: torch.Tensor) -> Optional[MergePlan]:
        if not self.ready:
            self.plan = self.state.plan_for(metric)
            self.ready = True
        return self.plan
