"""ToMe (and importance mode) on a ComfyUI UNet: ``apply_tome_patch(model, ToMeOptions, start, end)``.

ComfyUI runs a UNet call as: the diffusion-model wrapper (``PatchState.begin_call``), then for
every BasicTransformerBlock: attn1_patch, attn1, attn1_output_patch, attn2_patch, attn2,
attn2_output_patch, ff. The plan of a block call is computed once, lazily, by the first merged
operator from its own normed input (the runtime's ``BlockSlot``), exactly as in the diffusers
adapter, and reused by the other operators of that block.

- ``Attn1Patch`` / ``Attn1OutputPatch``: self-attention. ComfyUI hands attn1_patch the normed
  hidden states n = norm1(x) as (n, context, value), all (B, N, C) before projection; returning
  merged versions of all three merges Q, K and V. The output patch unmerges back to N tokens.
- ``Attn2Patch`` / ``Attn2OutputPatch``: cross-attention, queries only (K/V are the text).
- ``MergedFeedForward``: ComfyUI has no feed-forward patch point, so ``merge_mlp`` replaces each
  block's ``ff`` through ``ModelPatcher.add_object_patch`` (applied when the model loads, undone
  on unload) with this stand-in, which shares the original's parameters under the same names.
- ``MergedBlock``: block mode (``unet_mode="block"``, core/block.py) stands in for each whole
  BasicTransformerBlock the same way: the block runs on merged tokens, its update is unmerged.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core import MergeRuntime, OptionError, TomePolicy, ToMeOptions, merge, unmerge
from ..core.block import merge_block, unet_mode, unmerge_block
from .discovery import auto_max_downsample, transformer_blocks, unet_of
from .dit import dit_patch
from .dit_families import family_of
from .video_dit import SUPPORTED_VIDEO_DITS, apply_video_patch, video_family_of
from .patching import PatchState, SharedPatch, StandIn, patched_clone, sigma_range, unsupported_reason


def _merging_plan(state, n, enabled: bool, which: str):
    """The block call's plan for input n when ``which`` merges (recorded for its output patch)."""
    plan = state.slot.get(n) if enabled else None
    if plan is not None:
        state.slot.merged.add(which)
    return plan


class Attn1Patch(SharedPatch):
    """attn1_patch(n, context, value, extra_options) -> merged (n, context, value)."""

    def __call__(self, n, context, value, extra_options):
        state = self.state
        state.slot.reset(scope=(extra_options.get("block"), extra_options.get("block_index")))  # a block call starts
        plan = _merging_plan(state, n, state.opts.merge_attn, "attn1")
        if plan is None:
            return n, context, value
        merged = merge(n, plan)
        # Self-attention: K/V inputs are n itself (or a same-length stand-in) -> merge them too.
        # A cross-attention attn1 (disable_self_attn) keeps its text context.
        context = merged if context is n else (merge(context, plan) if _same_grid(context, n) else context)
        value = merged if value is n else (merge(value, plan) if _same_grid(value, n) else value)
        return merged, context, value


class Attn2Patch(SharedPatch):
    """attn2_patch: merges the queries only."""

    def __call__(self, n, context, value, extra_options):
        plan = _merging_plan(self.state, n, self.state.opts.merge_crossattn, "attn2")
        return (n, context, value) if plan is None else (merge(n, plan), context, value)


class _OutputPatch(SharedPatch):
    which = ""

    def __call__(self, n, extra_options):
        slot = self.state.slot
        if self.which not in slot.merged:
            return n
        slot.merged.discard(self.which)
        return unmerge(n, slot.plan)


class Attn1OutputPatch(_OutputPatch):
    which = "attn1"


class Attn2OutputPatch(_OutputPatch):
    which = "attn2"


def _same_grid(t, n) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim == 3 and t.shape[:2] == n.shape[:2]


class MergedFeedForward(StandIn):
    """Stands in for a block's ``ff``: merge(norm3(x)) -> original ff -> unmerge."""

    def forward(self, x, *args, **kwargs):
        plan = self.state.slot.get(x) if self.state.opts.merge_mlp else None
        if plan is None:
            return self.inner(x, *args, **kwargs)
        return unmerge(self.inner(merge(x, plan), *args, **kwargs), plan)


class MergedBlock(StandIn):
    """Stands in for a BasicTransformerBlock in block mode (``unet_mode="block"``): its tokens
    merged once (``core.block.merge_block``), the original block run on them (its attention
    patches and the other nodes' patches see the merged tokens), its update unmerged."""

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006 (ComfyUI's signature)
        slot = self.state.slot
        slot.reset(scope=(transformer_options.get("block"), transformer_options.get("block_index")))  # a block call starts
        found = merge_block(slot, x)
        if found is None:
            return self.inner(x, context=context, transformer_options=transformer_options)
        merged, plan = found
        y = self.inner(merged, context=context, transformer_options=transformer_options)
        return unmerge_block(x, merged, y, plan)


def tome_state(opts: ToMeOptions, max_downsample: int, sigma_start: float = float("inf"), sigma_end: float = 0.0) -> PatchState:
    """The shared state of a ToMe patch: a MergeRuntime with the ToMe policy."""
    return PatchState(MergeRuntime(TomePolicy(opts), max_downsample, sigma_start, sigma_end))


def install_merge_patch(model, opts: ToMeOptions, start_percent: float, end_percent: float, make_state=tome_state):
    """(patched clone, its PatchState, None) or (``model``, None, reason): the block patches of
    every plan-based node; ``make_state(opts, max_downsample, sigma_start, sigma_end)`` builds the
    PatchState with the method's policy."""
    unet = unet_of(model)
    if unet is None:
        return model, None, unsupported_reason(model)
    if opts.max_downsample == "auto":
        max_ds = auto_max_downsample(unet)
        if max_ds is None:
            return model, None, f"tomesd-ext: token merging skipped, {type(unet).__name__} has no spatial transformer blocks"
    else:
        max_ds = opts.max_downsample
    sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
    state = make_state(opts, max_ds, sigma_start, sigma_end)

    m = patched_clone(model, state)
    if unet_mode(opts) == "block":
        for path, _block in transformer_blocks(unet):
            m.add_object_patch(path, MergedBlock(StandIn.unwrap(m.get_model_object(path)), state))
        return m, state, None
    m.set_model_attn1_patch(Attn1Patch(state))  # always: it marks the start of every block call
    if opts.merge_attn:
        m.set_model_attn1_output_patch(Attn1OutputPatch(state))
    if opts.merge_crossattn:
        m.set_model_attn2_patch(Attn2Patch(state))
        m.set_model_attn2_output_patch(Attn2OutputPatch(state))
    if opts.merge_mlp:
        for path, _block in transformer_blocks(unet):
            key = path + ".ff"
            m.add_object_patch(key, MergedFeedForward(StandIn.unwrap(m.get_model_object(key)), state))
    return m, state, None


def apply_tome_patch(
    model, opts: ToMeOptions, start_percent: float = 0.0, end_percent: float = 1.0
) -> Tuple[object, Optional[str]]:
    """Return (patched clone, None), or (``model`` unchanged, reason) when it cannot be patched.

    opts: validated ``ToMeOptions`` (mode "tome"); a previous tomesd-ext patch on ``model`` is
    replaced. Plan reuse (``reuse``, ``reuse_steps``) works as in the diffusers adapter. A model
    whose denoiser is an image transformer (Flux, SD3, Qwen-Image, PixArt, Lumina2 / Z-Image) gets the DiT
    patch (dit.py), a video transformer (Wan, HunyuanVideo, LTX-Video) the video DiT patch (video_dit.py).
    """
    if opts.mode != "tome":
        raise ValueError(f"opts.mode={opts.mode!r}: use apply_importance_patch for mode='importance'")
    if unet_of(model) is None:
        m, _state, reason = install_transformer_patch(model, opts, start_percent, end_percent)
        return m, reason
    _refuse_per_block(opts.block_ratios is not None or opts.auto, "UNets")
    m, _state, reason = install_merge_patch(model, opts, start_percent, end_percent)
    return m, reason


def install_transformer_patch(model, opts: ToMeOptions, start_percent: float, end_percent: float):
    """(patched clone, its state, None) or (``model``, None, reason) for a model whose denoiser is
    no UNet: the DiT patch (dit.py) of an image transformer, the video DiT patch (video_dit.py) of
    a video transformer, with the policy of ``opts.mode`` (importance: importance.py feeds it)."""
    per_block = opts.block_ratios is not None or opts.auto
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    video = video_family_of(dm)
    if video is not None:
        _refuse_per_block(per_block, "video transformers")
        return (*apply_video_patch(model, dm, video, opts, start_percent, end_percent), None)
    if per_block and family_of(dm) is None:
        _refuse_per_block(True, "PixArt and Lumina2 / Z-Image")
    m, state, reason = dit_patch(model, opts, start_percent, end_percent)
    return m, state, reason and f"{reason}, and the video transformers {SUPPORTED_VIDEO_DITS}"


def _refuse_per_block(per_block: bool, what: str) -> None:
    """block_ratios / ratio="auto" run on ComfyUI's image transformers only (for now)."""
    if per_block:
        raise OptionError(f"ratio='auto' (max_error) and block_ratios are not supported on ComfyUI's {what} yet: "
                          "only on its image transformers Flux.1, Flux.2, SD3 and Qwen-Image (docs/schedules.md)")
