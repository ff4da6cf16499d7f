"""Importance mode for diffusers: the CFG importance map from the denoiser's own output.

The denoiser's forward pre-hook detects the CFG layout of its input (``core.read_call``, which
reads it with the step's timestep in one host read: standard pipelines call the denoiser on
``torch.cat([latents] * 2)``) and hands the policy the rows of each
image; a forward hook takes ``core.importance_map`` of the output, which drives the next call's
destinations (``core.ImportancePolicy``). A UNetMotionModel's clip batch (B, C, F, H, W) gives one
map per clip frame, cond and uncond of the same frame paired (``ImportancePolicy.use_clip_map``). No CFG pair (guidance <= 1, a guidance-distilled model,
a 3-way batch): ToMe's window policy with one warning. Nothing else runs: no second forward pass.
"""

from __future__ import annotations

import warnings

import torch

from ..core import importance_map, read_call


class ImportanceHooks:
    """The denoiser hooks that feed an ImportancePolicy: ``before(sample, timestep)`` runs in the
    patch's call pre-hook (CFG layout, rows of each image), ``post_hook`` takes the map of the
    output. ``layout`` is the CFG layout of the last call ("halves", "interleaved" or None)."""

    def __init__(self, policy):
        self.policy = policy
        self.layout = None
        self.channels = 0
        self.shape = None  # (batch, ndim) of the call's sample: its output must match

    def read(self, sample, timestep) -> float:
        """The call's timestep key; the CFG layout found in the same host read is kept for ``before``."""
        key, self.layout = read_call(sample, timestep, self.policy.opts.cfg_layout)
        return key

    def before(self, sample, timestep) -> None:
        policy = self.policy
        if self.layout is None:
            if policy.opts.cfg_layout == "off":
                policy.set_map(None)
            else:
                policy.no_map(lambda text: warnings.warn(text, stacklevel=4))
            return
        B, C = sample.shape[:2]
        self.channels, self.shape = C, (B, sample.ndim)
        hw = tuple(sample.shape[-2:])
        if sample.ndim == 5:  # AnimateDiff: B clips of F frames
            policy.use_clip_map(self.layout, B, sample.shape[2], hw, sample.device)
        else:
            policy.use_map(policy.image_rows(B, self.layout, sample.device), B, hw)

    def post_hook(self, module, args, output) -> None:
        policy = self.policy
        if self.layout is None:
            return
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if not isinstance(out, torch.Tensor) or (out.shape[0], out.ndim) != self.shape:
            policy.set_map(None)
            return
        if out.shape[1] == 2 * self.channels:  # learned sigma: (prediction, variance)
            out = out[:, : self.channels]
        hmap = importance_map(out.detach(), self.layout)  # a clip batch: (clips, F, H, W)
        policy.set_map(hmap.flatten(0, 1) if hmap.ndim == 4 else hmap)  # clip i's frame f at i*F + f


def track_importance(patch) -> ImportanceHooks:
    """Add the hooks that feed ``patch.policy`` (an ImportancePolicy); returns them."""
    hooks = ImportanceHooks(patch.policy)
    patch.track_calls(before=hooks.before, read=hooks.read)
    patch.hook(patch.model.register_forward_hook(hooks.post_hook))
    return hooks
