"""Importance-based token merging (Wu et al., arXiv 2411.16720) on a ComfyUI MODEL.

The ToMe patches of ``tome.py`` (a UNet's) or of ``dit.py`` / ``dit_hooks.py`` / ``video_dit.py``
(a transformer's) with the core ``ImportancePolicy`` (the policy of the diffusers
adapter's ``mode="importance"``, docs/importance.md). Only the source of the map differs:

- map: a ``sampler_post_cfg_function`` receives ComfyUI's x0 predictions ``cond_denoised`` and
  ``uncond_denoised`` (B0, C, [T,] H, W) and ``sigma``: ``core.importance_map_from_x0``. The map of a
  step drives the next step's denoiser calls.
- batch: ComfyUI concatenates the chunks of a call in the order of
  ``transformer_options["cond_or_uncond"]`` (uncond first, cond first, or one chunk per call when
  memory is short); each chunk holds the B0 images, so image i is rows i, B0 + i, ... whatever
  the order.
- AnimateDiff-Evolved (animatediff.py): the map has one row per frame of the whole clip; a call
  of a context window uses its frames' rows (``ImportancePolicy.use_clip_map``: with
  frame_plan "shared" their mean for the clip's one plan, "per-frame" each frame's own, its
  cond and uncond rows paired).
- transformers (the ToMe node's families, ``install_transformer_patch``: the DiT, hooked and video
  DiT patches with the ``ImportancePolicy``): a transformer's plan is shared by the call's batch,
  so the map is the mean over the step's images at the token grid (``PatchState.token_map``,
  ``core.shared_token_map``) and every call of the next step uses it
  (``ImportancePolicy.use_shared_map``), whatever its cond/uncond chunks.
- cfg = 1: ComfyUI skips the uncond pass and hands the post-CFG function an all-zero
  ``uncond_denoised``; detected from ``cond_scale`` (or a missing uncond): no map, ToMe's window
  partition (bit-identical to the ToMe node), one console warning.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch

from ..core import NO_CFG_WARNING, ImportancePolicy, MergeRuntime, ToMeOptions, importance_map_from_x0
from .animatediff import clip_call
from .discovery import unet_of
from .patching import PatchState, SharedPatch
from .tome import install_merge_patch, install_transformer_patch

__all__ = ["NO_CFG_WARNING", "ImportanceMapHook", "apply_importance_patch", "importance_state"]

log = logging.getLogger("tomesd_ext")


def importance_state(opts: ToMeOptions, max_downsample: int, sigma_start: float = float("inf"), sigma_end: float = 0.0) -> PatchState:
    """The shared state of an importance patch: a MergeRuntime with the ImportancePolicy, whose
    per-call step finds the rows of each image from ``cond_or_uncond`` and offers the map."""
    policy = ImportancePolicy(opts)
    state = PatchState(MergeRuntime(policy, max_downsample, sigma_start, sigma_end))

    def on_call(x, transformer_options):
        runtime = state.runtime
        chunks = len(transformer_options.get("cond_or_uncond") or ())
        if runtime.latent_hw is None or chunks == 0 or x.shape[0] % chunks:
            return
        clip = clip_call(x, transformer_options)
        if clip is not None:  # AnimateDiff: the window's frames of the per-frame map of the whole clip
            policy.use_clip_map("halves", clip.chunks, clip.frames, runtime.latent_hw, x.device, images=1,
                                frame_idx=clip.frame_idx)
            return
        rows = policy.image_rows(x.shape[0], "halves", x.device, x.shape[0] // chunks)
        policy.use_map(rows, x.shape[0], runtime.latent_hw)

    state.on_call = on_call
    return state


def _shared_map_user(state: PatchState):
    """The per-call step of a transformer patch: its plans are shared by the call's batch (one
    metric row, the mean of its rows), so the call uses the step's mean map (``token_map``) at its
    merged token grid, whatever the order or split of its cond/uncond chunks."""

    def on_call(x, transformer_options):
        if state.runtime.latent_hw is not None:
            state.policy.use_shared_map(state.runtime.grid_shape)

    return on_call


class ImportanceMapHook(SharedPatch):
    """sampler_post_cfg_function(args) -> args["denoised"] unchanged; records the map."""

    def __call__(self, args):
        self.take_map(args["cond_denoised"], args["uncond_denoised"], args["sigma"], args["cond_scale"],
                      has_uncond=args.get("uncond") is not None)
        return args["denoised"]

    def take_map(self, cond_denoised, uncond_denoised, sigma, cond_scale, has_uncond=True) -> None:
        """Store the map of a finished CFG step. cond/uncond_denoised: (B0, C, [T,] H, W) x0
        predictions; sigma: (B0,) or a number."""
        policy = self.state.policy
        if not has_uncond or math.isclose(float(cond_scale), 1.0):
            policy.no_map(log.warning)
            return
        if cond_denoised.ndim not in (4, 5) or cond_denoised.shape != uncond_denoised.shape:
            policy.set_map(None)
            return
        if bool((torch.as_tensor(sigma) <= 0).any()):
            policy.set_map(None)
            return
        hmap = importance_map_from_x0(cond_denoised, uncond_denoised, sigma)
        policy.set_map(self.state.token_map(hmap, tuple(cond_denoised.shape)))


def apply_importance_patch(
    model, opts: ToMeOptions, start_percent: float = 0.0, end_percent: float = 1.0
) -> Tuple[object, Optional[str]]:
    """Return (patched clone, None), or (``model`` unchanged, reason) when it cannot be patched.

    opts: validated ``ToMeOptions`` with ``mode="importance"``; a previous tomesd-ext patch (ToMe
    or importance) on ``model`` is replaced.
    """
    if opts.mode != "importance":
        raise ValueError(f"opts.mode={opts.mode!r}: apply_importance_patch needs mode='importance'")
    if unet_of(model) is None:
        m, state, reason = install_transformer_patch(model, opts, start_percent, end_percent)
        if reason is None:
            state.on_call = _shared_map_user(state)
    else:
        m, state, reason = install_merge_patch(model, opts, start_percent, end_percent, importance_state)
    if reason is None:
        m.set_model_sampler_post_cfg_function(ImportanceMapHook(state))
    return m, reason
