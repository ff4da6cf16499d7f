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

from ..core.importance import ImportancePlanner, image_rows, importance_map

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


class ImportanceTracker(ImportancePlanner):
    """Per patched denoiser: the core ``ImportancePlanner`` fed from diffusers forward hooks.

    Its ``plan`` is installed as the ModelState's planner; the pre-hook detects the CFG layout,
    the post-hook stores the map of the call's output.
    """

    def __init__(self, state):
        super().__init__()
        self.state = state
        self.opts = state.opts
        self.layout: Optional[str] = None
        self._rows_cache = {}
        self.sample_channels = 0
        self.warned = False

    def install(self, model) -> list:
        return [
            model.register_forward_pre_hook(self.pre_hook, with_kwargs=True),
            model.register_forward_hook(self.post_hook),
        ]

    def pre_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        self.advance(self.state.step_key)
        self.layout = detect_layout(sample, self.opts.cfg_layout)
        if self.layout is None:
            if not self.warned and self.opts.cfg_layout != "off":
                warnings.warn(NO_CFG_WARNING, stacklevel=2)
            self.warned = True
            self.set_map(None)
            return
        B, C, H, W = sample.shape
        self.sample_channels = C
        key = (B, self.layout, sample.device)
        if key not in self._rows_cache:
            self._rows_cache = {key: [r.to(sample.device) for r in image_rows(B, self.layout)]}
        self.use_map(self._rows_cache[key], B, (H, W))

    def post_hook(self, module, args, output):
        if self.layout is None:
            return
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != self.batch:
            self.set_map(None)
            return
        if out.shape[1] == 2 * self.sample_channels:  # learned sigma: (prediction, variance)
            out = out[:, : self.sample_channels]
        self.set_map(importance_map(out.detach(), self.layout))
