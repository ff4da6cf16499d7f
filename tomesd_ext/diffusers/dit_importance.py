"""Importance mode on diffusers' image transformers: the CFG map from the transformer's output.

As for UNets (importance.py), the map of step t drives step t+1. Two CFG shapes occur:

- one batched call on the latents twice over (SD3, PixArt, Z-Image): rows pair up as "halves" or
  "interleaved" (``core.read_call``: with the timestep, in one host read);
- two calls per step on the same latent and timestep (Qwen-Image runs cond, then uncond): the
  second call's output minus the first's.

Outputs are latents (B, C, H, W), lists of (C, 1, H, W) (Z-Image) or packed tokens (B, N, C) whose
first h*w tokens are the image grid (Flux-style packing). Video transformers: latents (B, C, F, H,
W) (Wan, HunyuanVideo) or packed tokens (B, N, C) whose grid follows ``lead`` conditioning tokens
(LTX-Video); their map is pooled to the frames x h x w token grid (``pool_to_video_grid``), less
the first frame when ``keep_first_frame`` holds it back. DiT plans are shared by the batch, so the
map is the mean over the images of the call. No CFG (guidance-distilled Flux, cfg 1): ToMe's window
partition with one warning, as for UNets.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..core import importance_map, read_call, shared_token_map
from ..core.dit import merged_video_grid


def _latent(t, grid, lead=0) -> Optional[torch.Tensor]:
    """A call's input or output as (B, C, H, W) (a video of several frames: (B, C, F, H, W)), or
    None when it has no image grid. lead: tokens before a packed video grid."""
    if isinstance(t, (list, tuple)):
        if not t or not all(isinstance(x, torch.Tensor) and x.shape == t[0].shape for x in t):
            return None
        t = torch.stack(list(t))
    if not isinstance(t, torch.Tensor):
        return None
    if t.ndim == 3 and grid is not None and len(grid) == 3 and t.shape[1] >= lead + grid[0] * grid[1] * grid[2]:
        n = grid[0] * grid[1] * grid[2]
        t = t[:, lead : lead + n].transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)
    if t.ndim == 5 and t.shape[2] == 1:
        t = t[:, :, 0]
    if t.ndim == 3 and grid is not None and len(grid) == 2 and t.shape[1] >= grid[0] * grid[1]:
        h, w = grid
        return t[:, : h * w].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
    return t if t.ndim in (4, 5) else None


class DitImportance:
    """``before(sample, grid, lead)`` in the call pre-hook, ``post_hook`` on the transformer's output."""

    def __init__(self, policy):
        self.policy = policy
        self.layout = None
        self.pending = None  # (step key, input) of a call that may be the first of a cond/uncond pair
        self.prev_out = None
        self.grid = None
        self.lead = 0
        self.sample = None

    def read(self, sample, grid, lead, timestep) -> float:
        """The call's timestep key; its latent and CFG layout (found in the same host read) are kept
        for ``before``."""
        self.grid, self.lead = grid, lead
        self.sample = _latent(sample, grid, lead)
        key, self.layout = read_call(self.sample, timestep, self.policy.opts.cfg_layout)
        return key

    def before(self) -> None:
        policy = self.policy
        x = self.sample
        if x is not None:
            shape = self._merged_grid() if x.ndim == 5 else tuple(x.shape[-2:])
            if shape is not None:
                policy.use_shared_map(shape)

    def _merged_grid(self):
        """The token grid a video call merges: (frames, h, w), less a kept first frame; (h, w)
        when one frame is left; None when none is."""
        return merged_video_grid(self.grid, self.policy.opts.keep_first_frame)[0]

    def _store(self, pred: torch.Tensor, layout: str) -> None:
        """set_map of the mean map of a CFG prediction (a video's at its merged token grid)."""
        grid = self.grid if pred.ndim == 5 else None  # an image's map stays at its latent size
        self.policy.set_map(shared_token_map(importance_map(pred, layout), grid, self.policy.opts.keep_first_frame))

    def post_hook(self, module, args, output) -> None:
        policy, x = self.policy, self.sample
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        out = _latent(out, self.grid, self.lead)
        if x is None or out is None or out.shape[0] != x.shape[0] or out.ndim != x.ndim:
            policy.set_map(None)
            return
        out = out.detach()[:, : x.shape[1]]  # learned sigma: (prediction, variance)
        if self.layout is not None:
            self._store(out, self.layout)
            self.pending = None
            return
        prev = self.pending
        if prev is not None and prev[0] == policy.step_key and torch.equal(prev[1], x) and prev[2].shape == out.shape:
            self._store(torch.cat([prev[2], out]), "halves")
            self.pending = None
            return
        if prev is not None and prev[0] != policy.step_key and policy.hmap is None:
            policy.no_map(lambda text: warnings.warn(text, stacklevel=2))
        self.pending = (policy.step_key, x, out) if policy.opts.cfg_layout != "off" else None


def track_dit_importance(patch) -> DitImportance:
    """The output hook feeding ``patch.policy``; its ``before`` runs in the DiT call pre-hook."""
    hooks = DitImportance(patch.policy)
    patch.hook(patch.model.register_forward_hook(hooks.post_hook))
    return hooks
