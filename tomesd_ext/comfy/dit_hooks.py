"""ToMe on ComfyUI transformers whose blocks take no ``patches_replace`` (v0.8.0): PixArt-α/Σ
(``comfy.ldm.pixart.pixartms.PixArtMS``) and Lumina2 / Z-Image (``comfy.ldm.lumina.model.NextDiT``).

Forward pre/post hooks on the blocks, registered by the clone's APPLY_MODEL wrapper when its call
starts and removed in its ``finally``: the shared base model carries nothing outside our call.
Block mode (core/dit.py): the pre-hook merges the image span of the block's input (and gathers
the rotary table there), the post-hook unmerges the block's update. kv mode (Lumina only: PixArt's
attention does not read ``transformer_options``): the pre-hook offers the block's plan to
``KeysValuesAttention`` (dit.py), the post-hook withdraws it.

- PixArt: ``block(x, y, t, mask, HW)``, x the image tokens alone; a model with KV compression
  (``sr_ratio`` > 1, which reshapes x to the grid) is not merged.
- NextDiT: ``layer(x, x_mask, freqs_cis, adaln_input)`` over the main layers (the refiners stay
  whole), x = [caption (padded), image, pad tokens up to ``pad_tokens_multiple``], freqs_cis
  (B, L, ...) over the same sequence; a call with an ``x_mask`` is not merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..core import MergeRuntime, OptionError, ToMeOptions
from ..core.dit import dit_settings, gather_span, merge_span, merged_blocks, span_plan, unmerge_update
from .dit import ApplyModelWrapper, DitState, KeysValuesAttention
from .patching import ATTENTION_OVERRIDE, SharedPatch, merge_policy, patched_clone, sigma_range


@dataclass(frozen=True)
class HookedFamily:
    """key: the core family key (DIT_DEFAULTS); blocks: (diffusion model) -> the block modules in
    execution order; start: (diffusion model, block, args, n image tokens) -> where the image span
    starts in args[0], or None (not merged); pe_arg: the index of the rotary table in args (None:
    none); kv: kv mode reaches its attention."""

    label: str
    key: str
    blocks: Callable
    start: Callable
    pe_arg: Optional[int]
    kv: bool


def _pixart_start(dm, block, args, n):
    if getattr(getattr(block, "attn", None), "sr_ratio", 1) != 1 or args[0].shape[1] != n:
        return None
    return 0


def _lumina_start(dm, block, args, n):
    if len(args) < 3 or args[1] is not None:
        return None
    multiple = getattr(dm, "pad_tokens_multiple", None)
    pad = (-n) % multiple if multiple else 0
    start = args[0].shape[1] - n - pad
    return start if start >= 0 else None


PIXART = HookedFamily("PixArt", "pixart", lambda dm: list(dm.blocks), _pixart_start, None, False)
LUMINA = HookedFamily("Lumina2 / Z-Image", "z-image", lambda dm: list(dm.layers), _lumina_start, 2, True)


def hooked_family_of(diffusion_model) -> Optional[HookedFamily]:
    """The hooked family of a ComfyUI diffusion model (by class, subclasses included), or None."""
    try:
        from comfy.ldm.lumina.model import NextDiT
        from comfy.ldm.pixart.pixartms import PixArtMS
    except ImportError:
        return None
    for cls, family in ((PixArtMS, PIXART), (NextDiT, LUMINA)):
        if isinstance(diffusion_model, cls):
            return family
    return None


class BlockHooks:
    """The pre/post hook pair of one block (block or kv mode), state: the patch's DitState."""

    def __init__(self, state, family: HookedFamily, dm, block, slot, mode: str):
        self.state, self.family, self.dm, self.block, self.slot, self.mode = state, family, dm, block, slot, mode
        self.pending = None  # block mode: (x, merged x, plan, start) between the two hooks

    def attach(self):
        """Register both hooks; returns their handles (remove them when the call ends)."""
        return [self.block.register_forward_pre_hook(self.pre, with_kwargs=True),
                self.block.register_forward_hook(self.post, with_kwargs=True)]

    def _plan(self, args):
        rt = self.state.runtime
        self.slot.reset()
        x = args[0] if args else None
        if not rt.active or not isinstance(x, torch.Tensor) or x.ndim != 3:
            return None, 0
        n = rt.latent_hw[0] * rt.latent_hw[1]
        start = self.family.start(self.dm, self.block, args, n)
        if start is None or start + n > x.shape[1]:
            return None, 0
        return span_plan(self.slot, x, start), start

    def pre(self, module, args, kwargs):
        self.pending, self.state.kv = None, None
        plan, start = self._plan(args)
        if plan is None:
            return None
        if self.mode == "kv":
            self.state.kv = (plan, start)
            return None
        x = args[0]
        merged = merge_span(x, plan, start)
        new = list(args)
        new[0] = merged
        pe = self.family.pe_arg
        if pe is not None and isinstance(args[pe], torch.Tensor) and args[pe].shape[1] == x.shape[1]:
            new[pe] = gather_span(args[pe], plan, start, 1)
        self.pending = (x, merged, plan, start)
        return tuple(new), kwargs

    def post(self, module, args, kwargs, output):
        self.state.kv = None
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        x, merged, plan, start = pending
        return unmerge_update(x, merged, output, plan, start)


class HookedApplyModel(SharedPatch):
    """The clone's APPLY_MODEL wrapper for a hooked family: the hooks live for the call only.

    Wraps dit.ApplyModelWrapper ``inner`` (which starts and ends the runtime's call)."""

    def __init__(self, inner: ApplyModelWrapper, hooks):
        super().__init__(inner.state)
        self.inner, self.hooks = inner, hooks

    def __call__(self, executor, *args, **kwargs):
        handles = []
        try:
            for h in self.hooks:
                handles += h.attach()
            return self.inner(executor, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            for h in self.hooks:
                h.pending = None


def apply_hooked_patch(model, dm, family: HookedFamily, opts: ToMeOptions, start_percent: float, end_percent: float):
    """(the patched clone of ``model`` (diffusion model ``dm`` of ``family``), its DitState); see dit_patch."""
    mode, skip = dit_settings(family.key, opts.dit_mode, opts.skip_ends)
    if mode not in ("block", "kv") or (mode == "kv" and not family.kv):
        usable = "'block' or 'kv'" if family.kv else "'block'"
        raise OptionError(f"dit_mode={mode!r} is not available for {family.label} in ComfyUI; use {usable}")
    sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
    runtime = MergeRuntime(merge_policy(opts), 1, sigma_start, sigma_end)
    state = DitState(runtime, family, int(getattr(dm, "patch_size", 2)))
    blocks = family.blocks(dm)
    hooks = [BlockHooks(state, family, dm, blocks[i], runtime.new_slot(), mode) for i in merged_blocks(len(blocks), skip)]
    m = patched_clone(model, state, HookedApplyModel(ApplyModelWrapper(state), hooks))
    if mode == "kv":
        to = m.model_options.setdefault("transformer_options", {})
        to[ATTENTION_OVERRIDE] = KeysValuesAttention(state, to.get(ATTENTION_OVERRIDE))
    return m, state
