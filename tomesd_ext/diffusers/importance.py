"""Importance mode for diffusers: capture the CFG importance map from the denoiser's own output.

A forward hook on the denoiser reads the prediction of each batched CFG call and keeps
H = channel-mean |pred_cond - pred_uncond| (B0, H, W); the next call (the next step) draws its
destinations from it (core/importance.py). Nothing else runs: no second forward pass.

CFG layout: the standard pipelines call the denoiser on `torch.cat([latents] * 2)`, so the two
rows of an image are bit-identical in `sample`. The pre-hook checks that instead of assuming a
batch layout: halves equal -> "halves" ([uncond..., cond...] or the reverse: |cond - uncond| does
not depend on which half is which); rows 2i, 2i+1 equal -> "interleaved"; neither -> no CFG
batch (guidance <= 1, guidance-distilled/LCM models, 3-way batches such as InstructPix2Pix):
ToMe's window policy with one warning. `cfg_layout` can force "halves"/"interleaved" or "off".
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..core import derive_seed, tome_plan, window_partition
from ..core.importance import (
    image_rows,
    importance_map,
    importance_partitions,
    importance_plan,
    pool_to_grid,
    with_prune_weights,
)

NO_CFG_WARNING = (
    "tomesd-ext importance mode: the denoiser batch is not a classifier-free-guidance pair "
    "(guidance_scale <= 1, a guidance-distilled model, or another batch layout), so there is no "
    "importance map; merging with ToMe's random window partition instead"
)


def detect_layout(sample: torch.Tensor, setting: str = "auto") -> Optional[str]:
    """The CFG layout of a denoiser input (B, C, H, W): "halves", "interleaved" or None."""
    if setting == "off" or sample is None or sample.ndim != 4:
        return None
    B = sample.shape[0]
    if B < 2 or B % 2:
        return None
    if setting != "auto":
        return setting
    a, b = sample.chunk(2)
    if torch.equal(a, b):
        return "halves"
    if torch.equal(sample[0::2], sample[1::2]):
        return "interleaved"
    return None


class ImportanceTracker:
    """Per patched denoiser: the map of the last call and the partitions of the current one.

    Installed as the ModelState's planner; `counts` records which policy planned each block
    call ("importance" or "tome"), for tests and benchmarks.
    """

    def __init__(self, state):
        self.state = state
        self.opts = state.opts
        self.hmap: Optional[torch.Tensor] = None  # (B0, H, W) of the last CFG call
        self.hmap_step: Optional[float] = None
        self.layout: Optional[str] = None
        self.active: Optional[torch.Tensor] = None  # map used by the call in progress
        self.batch = 0
        self.rows: list = []  # row indices of each image in the batch
        self._rows_cache = {}
        self.sample_channels = 0
        self.parts = {}
        self.warned = False
        self.counts = {"importance": 0, "tome": 0}
        self.step_index = 0  # denoiser calls since the run started (prune phase)
        self.last_step: Optional[float] = None

    def install(self, model) -> list:
        return [
            model.register_forward_pre_hook(self.pre_hook, with_kwargs=True),
            model.register_forward_hook(self.post_hook),
        ]

    def pre_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        self.parts = {}
        step = self.state.step_key
        new_run = self.last_step is None or step > self.last_step
        self.step_index = 0 if new_run else self.step_index + 1
        self.last_step = step
        self.layout = detect_layout(sample, self.opts.cfg_layout)
        self.active = None
        if self.layout is None:
            if not self.warned and self.opts.cfg_layout != "off":
                warnings.warn(NO_CFG_WARNING, stacklevel=2)
            self.warned = True
            self.hmap = None
            return
        B, C, H, W = sample.shape
        B0 = B // 2
        self.batch, self.sample_channels = B, C
        key = (B, self.layout, sample.device)
        if key not in self._rows_cache:
            self._rows_cache = {key: [r.to(sample.device) for r in image_rows(B, self.layout)]}
        self.rows = self._rows_cache[key]
        prev = self.hmap
        # the map of the previous call of the same run: same images and size, timestep not
        # increasing (a larger timestep starts a new generation, which begins with ToMe windows)
        if prev is not None and tuple(prev.shape) == (B0, H, W) and step <= self.hmap_step:
            self.active = prev

    def post_hook(self, module, args, output):
        if self.layout is None:
            return
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != self.batch:
            self.hmap = None
            return
        if out.shape[1] == 2 * self.sample_channels:  # learned sigma: (prediction, variance)
            out = out[:, : self.sample_channels]
        self.hmap = importance_map(out.detach(), self.layout)
        self.hmap_step = self.state.step_key

    def plan(self, metric, h, w, opts, seed):
        """Planner of ModelState: importance partition when a map exists, else ToMe windows;
        during the first opts.prune_steps calls of a run the plan prunes instead of merging."""
        prune = self.step_index < opts.prune_steps
        if self.active is None or metric.shape[0] != self.batch:
            self.counts["tome"] += 1
            plan = tome_plan(metric, h, w, opts, seed)
            if plan is not None and prune:
                dst, _ = window_partition(h, w, opts.sx, opts.sy, seed, metric.device)
                plan = with_prune_weights(plan, dst)
            return plan
        parts = self.parts.get((h, w))
        if parts is None:
            pooled = pool_to_grid(self.active, h, w)
            key = derive_seed(opts.seed, "importance", self.state.step_key, h, w)
            parts = importance_partitions(pooled, h, w, opts.ratio, opts.sx, opts.sy, opts.pool_factor, key)
            self.parts[(h, w)] = parts
        self.counts["importance"] += 1
        plan = importance_plan(metric, parts, self.rows, (h, w))
        if plan is not None and prune:
            dst = torch.empty(metric.shape[0], parts[0].dst.numel(), dtype=torch.long, device=metric.device)
            for p, idx in zip(parts, self.rows):
                dst[idx] = p.dst
            plan = with_prune_weights(plan, dst)
        return plan
