"""Runtime state of one ToMe patch on a ComfyUI model (no tensors kept between calls).

ComfyUI runs a UNet call as: the diffusion-model wrapper (``begin_call``: latent size, timestep
and sigma of this call), then for every BasicTransformerBlock: attn1_patch (``begin_block``),
attn1, attn1_output_patch, attn2_patch, attn2, attn2_output_patch, ff. The plan of a block call
is computed once, lazily, by the first merged operator from its own normed input, exactly as in
the diffusers adapter, and reused by the other operators of that block.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core import MergePlan, ToMeOptions, level_plan, timestep_key, tome_plan


class SamplingWindow:
    """Per-UNet-call facts every tomesd-ext patch needs, set by ``DiffusionModelWrapper``.

    latent_hw, step_key (the UNet's timestep, the key of every random draw) and ``active``:
    sigma_end <= sigma <= sigma_start (the node's start/end percent mapped through
    ``model_sampling.percent_to_sigma``). Deep copies (ComfyUI deep-copies ``model_options`` on
    every ``clone()``) return the same object, so all patches of one node keep sharing it.
    """

    def __init__(self, sigma_start: float = float("inf"), sigma_end: float = 0.0):
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.latent_hw: Optional[Tuple[int, int]] = None
        self.step_key = 0.0
        self.active = False

    def __deepcopy__(self, memo):
        return self

    def begin_call(self, x: torch.Tensor, timesteps, sigmas, transformer_options=None) -> None:
        """x: (B, C, H, W) latent of this UNet call; timesteps: what the UNet receives;
        transformer_options: the call's (``cond_or_uncond``: the order of its batch chunks)."""
        self.latent_hw = tuple(x.shape[-2:]) if x is not None and x.ndim == 4 else None
        self.step_key = timestep_key(timesteps)
        if sigmas is None:
            self.active = self.latent_hw is not None
        else:
            sigma = float(sigmas.flatten()[0].item()) if hasattr(sigmas, "flatten") else float(sigmas)
            self.active = self.latent_hw is not None and self.sigma_end <= sigma <= self.sigma_start

    def end_call(self) -> None:
        self.active = False


class ComfyToMeState(SamplingWindow):
    """Options plus the per-call and per-block-call slots shared by every patch of one node.

    The sampling window, latent size and step come from ``SamplingWindow``; the patches, the
    wrapper and the feed-forward object patches share one instance.
    """

    def __init__(self, opts: ToMeOptions, max_downsample: int, sigma_start: float = float("inf"), sigma_end: float = 0.0):
        super().__init__(sigma_start, sigma_end)
        self.opts = opts
        self.max_downsample = max_downsample
        # (metric, h, w, opts, seed) -> plan: the destination policy (importance mode: the
        # ImportancePlanner's plan, tomesd_ext/comfy/importance.py)
        self.planner = tome_plan
        self.begin_block()

    def begin_call(self, x: torch.Tensor, timesteps, sigmas, transformer_options=None) -> None:
        super().begin_call(x, timesteps, sigmas, transformer_options)
        self.begin_block()

    def end_call(self) -> None:
        super().end_call()
        self.begin_block()

    def begin_block(self) -> None:
        self.plan: Optional[MergePlan] = None
        self.ready = False
        self.merged = {"attn1": False, "attn2": False}

    def plan_for(self, metric: torch.Tensor) -> Optional[MergePlan]:
        """The block call's plan (computed from the first metric asked for), or None."""
        if not self.ready:
            self.ready = True
            if self.active:
                self.plan = level_plan(
                    metric, self.latent_hw, self.step_key, self.opts, self.max_downsample, planner=self.planner
                )
        plan = self.plan
        if plan is None or metric.ndim != 3 or metric.shape[1] != plan.n_tokens:
            return None
        return plan
