"""Importance-based token merging (Wu et al., arXiv 2411.16720) on a ComfyUI MODEL.

The ToMe patches of ``patch.py`` with the core ``ImportancePlanner`` as destination policy (the
same planner as the diffusers adapter's ``mode="importance"``, docs/importance.md). Only the
source of the map differs:

- map: a ``sampler_post_cfg_function`` receives ComfyUI's x0 predictions ``cond_denoised`` and
  ``uncond_denoised`` (B0, C, H, W) and ``sigma`` (B0,). For an epsilon model
  x0 = x - sigma * eps, so ``mean_c |cond - uncond| / sigma`` is the diffusers adapter's
  ``mean_c |eps_cond - eps_uncond|`` (for v/flow models a per-step constant multiple of the
  prediction difference: the same ranking). The map of a step drives the next step's UNet calls.
- batch: ComfyUI concatenates the chunks of a call in the order of
  ``transformer_options["cond_or_uncond"]`` (uncond first, cond first, or one chunk per call when
  memory is short); each chunk holds the B0 images, so image i is rows i, B0 + i, ... whatever
  the order.
- cfg = 1: ComfyUI skips the uncond pass and hands the post-CFG function an all-zero
  ``uncond_denoised``; detected from ``cond_scale`` (or a missing uncond): no map, ToMe's window
  partition (the documented fallback, bit-identical to the ToMe node), one console warning.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch

from ..core import ImportancePlanner, ToMeOptions
from ..core.importance import image_rows
from .patch import install_patch
from .patches import _StatePatch
from .state import ComfyToMeState

log = logging.getLogger("tomesd_ext")

NO_CFG_WARNING = (
    "tomesd-ext importance merging: cfg = 1 (no unconditional pass), so there is no importance "
    "map; merging with ToMe's random window partition instead"
)


class ComfyImportanceState(ComfyToMeState):
    """ComfyToMeState whose planner is an ``ImportancePlanner`` fed by ``ImportanceMapHook``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.importance = ImportancePlanner()
        self.planner = self.importance.plan
        self.warned = False
        self._rows = {}

    def begin_call(self, x, timesteps, sigmas, transformer_options=None) -> None:
        super().begin_call(x, timesteps, sigmas, transformer_options)
        imp = self.importance
        imp.advance(self.step_key)
        chunks = len((transformer_options or {}).get("cond_or_uncond") or ())
        if self.latent_hw is None or chunks == 0 or x.shape[0] % chunks:
            return
        key = (x.shape[0], chunks, x.device)
        if key not in self._rows:
            self._rows = {key: [r.to(x.device) for r in image_rows(x.shape[0], "halves", x.shape[0] // chunks)]}
        imp.use_map(self._rows[key], x.shape[0], self.latent_hw)

    def take_map(self, cond_denoised, uncond_denoised, sigma, cond_scale, has_uncond=True) -> None:
        """Store the map of a finished CFG step. cond/uncond_denoised: (B0, C, H, W) x0
        predictions; sigma: (B0,) or a number."""
        imp = self.importance
        if not has_uncond or math.isclose(float(cond_scale), 1.0):
            if not self.warned:
                log.warning(NO_CFG_WARNING)
                self.warned = True
            imp.set_map(None)
            return
        if cond_denoised.ndim != 4 or cond_denoised.shape != uncond_denoised.shape:
            imp.set_map(None)
            return
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=cond_denoised.device).flatten()
        if bool((sigma <= 0).any()):
            imp.set_map(None)
            return
        diff = (cond_denoised.float() - uncond_denoised.float()).abs().mean(dim=1)
        imp.set_map(diff / sigma.view(-1, 1, 1))


class ImportanceMapHook(_StatePatch):
    """sampler_post_cfg_function(args) -> args["denoised"] unchanged; records the map."""

    def __call__(self, args):
        self.state.take_map(
            args["cond_denoised"], args["uncond_denoised"], args["sigma"], args["cond_scale"],
            has_uncond=args.get("uncond") is not None,
        )
        return args["denoised"]


def apply_importance_patch(
    model, opts: ToMeOptions, start_percent: float = 0.0, end_percent: float = 1.0
) -> Tuple[object, Optional[str]]:
    """Return (patched clone, None), or (``model`` unchanged, reason) when it cannot be patched.

    opts: validated ``ToMeOptions`` with ``mode="importance"``; a previous tomesd-ext patch (ToMe
    or importance) on ``model`` is replaced.
    """
    if opts.mode != "importance":
        raise ValueError(f"opts.mode={opts.mode!r}: apply_importance_patch needs mode='importance'")
    m, state, reason = install_patch(model, opts, start_percent, end_percent, ComfyImportanceState)
    if reason is None:
        m.set_model_sampler_post_cfg_function(ImportanceMapHook(state))
    return m, reason
