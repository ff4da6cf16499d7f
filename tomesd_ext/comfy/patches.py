"""The callables a ToMe node installs on a ComfyUI ModelPatcher, all calling tomesd_ext.core.

- ``DiffusionModelWrapper``: a ``WrappersMP.DIFFUSION_MODEL`` wrapper; records the latent size,
  the UNet's timestep (partition key, as the diffusers adapter's pre-hook) and whether sigma is
  inside the node's start/end range.
- ``Attn1Patch`` / ``Attn1OutputPatch``: self-attention. ComfyUI hands attn1_patch the normed
  hidden states n = norm1(x) as (n, context, value), all (B, N, C) before projection; returning
  merged versions of all three merges Q, K and V (tomesd's full saving). The output patch
  unmerges back to N tokens.
- ``Attn2Patch`` / ``Attn2OutputPatch``: cross-attention, queries only (K/V are the text).
- ``MergedFeedForward``: ComfyUI has no feed-forward patch point, so ``merge_mlp`` replaces each
  block's ``ff`` module through ``ModelPatcher.add_object_patch`` (ComfyUI applies it when the
  model is loaded and restores the original on unload) with this wrapper, which shares the
  original's parameters under the same names (LoRA keys and ``state_dict`` are unchanged).
"""

from __future__ import annotations

import torch

from ..core import merge, unmerge
from .state import ComfyToMeState


class _StatePatch:
    """Base of our patch callables: holds the shared state; deep copy keeps identity."""

    def __init__(self, state: ComfyToMeState):
        self.state = state

    def __deepcopy__(self, memo):
        return self


class DiffusionModelWrapper(_StatePatch):
    """wrapper(executor, x, timesteps, context, y, control, transformer_options, **kw)."""

    def __call__(self, executor, x, timesteps=None, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options") or {}
        self.state.begin_call(x, timesteps, options.get("sigmas"), options)
        try:
            return executor(x, timesteps, *args, **kwargs)
        finally:
            self.state.end_call()


class Attn1Patch(_StatePatch):
    """attn1_patch(n, context, value, extra_options) -> merged (n, context, value)."""

    def __call__(self, n, context, value, extra_options):
        state = self.state
        state.begin_block()  # attn1_patch runs first in every block call
        if not state.opts.merge_attn:
            return n, context, value
        plan = state.plan_for(n)
        if plan is None:
            return n, context, value
        state.merged["attn1"] = True
        merged = merge(n, plan)
        # Self-attention: K/V inputs are n itself (or a same-length stand-in) -> merge them too.
        # A cross-attention attn1 (disable_self_attn) keeps its text context.
        context = merged if context is n else (merge(context, plan) if _same_grid(context, n) else context)
        value = merged if value is n else (merge(value, plan) if _same_grid(value, n) else value)
        return merged, context, value


class Attn2Patch(_StatePatch):
    """attn2_patch: merges the queries only."""

    def __call__(self, n, context, value, extra_options):
        state = self.state
        if not state.opts.merge_crossattn:
            return n, context, value
        plan = state.plan_for(n)
        if plan is None:
            return n, context, value
        state.merged["attn2"] = True
        return merge(n, plan), context, value


class _OutputPatch(_StatePatch):
    which = ""

    def __call__(self, n, extra_options):
        state = self.state
        if not state.merged[self.which]:
            return n
        state.merged[self.which] = False
        return unmerge(n, state.plan)


class Attn1OutputPatch(_OutputPatch):
    which = "attn1"


class Attn2OutputPatch(_OutputPatch):
    which = "attn2"


def _same_grid(t, n) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim == 3 and t.shape[:2] == n.shape[:2]


class StandIn(torch.nn.Module):
    """Base of the modules a tomesd-ext node installs with ``ModelPatcher.add_object_patch``.

    The original module is kept unregistered in ``inner``; its children and parameters are
    registered here under their own names, so parameter paths (LoRA keys, ``state_dict``,
    low-VRAM casting) stay those of the original. ``_strip`` removes every StandIn.
    """

    def __init__(self, inner: torch.nn.Module, state):
        super().__init__()
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "state", state)
        for name, child in inner.named_children():
            self.add_module(name, child)
        for name, param in inner.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in inner.named_buffers(recurse=False):
            self.register_buffer(name, buf)

    def __deepcopy__(self, memo):
        return self

    @staticmethod
    def unwrap(module: torch.nn.Module) -> torch.nn.Module:
        """The original module under any stand-ins."""
        while isinstance(module, StandIn):
            module = module.inner
        return module


class MergedFeedForward(StandIn):
    """Stands in for a block's ``ff``: merge(norm3(x)) -> original ff -> unmerge."""

    def forward(self, x, *args, **kwargs):
        state = self.state
        plan = state.plan_for(x) if state.opts.merge_mlp else None
        if plan is None:
            return self.inner(x, *args, **kwargs)
        return unmerge(self.inner(merge(x, plan), *args, **kwargs), plan)
