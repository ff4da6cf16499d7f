"""apply_tome / remove_tome for diffusers UNets (SD 1.x, SD 2.x, SDXL, ControlNet).

Patches only through diffusers' and torch's extension points: the attention processor that is
set is wrapped (never replaced), the feed-forward gets forward pre/post hooks, and the latent
size comes from a forward pre-hook on the denoiser. Nothing of the model's classes, forwards or
weights is changed, so accelerate/diffusers hooks, LoRA and offloading keep working.
"""

from __future__ import annotations

from typing import List, Union

from ..core import ToMeOptions, merge, unmerge
from .importance import ImportanceTracker
from .processors import MergedAttnProcessor
from .state import BlockSlot, ModelState, timestep_key

PATCH_ATTR = "_tomesd_ext_patch"
SUPPORTED = "UNet2DConditionModel (SD 1.x, SD 2.x, SDXL and their img2img/inpaint/ControlNet pipelines) and ControlNetModel"


def _denoiser(obj):
    """The UNet to patch: obj itself, or a pipeline's `unet`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    if isinstance(obj, (UNet2DConditionModel, ControlNetModel)):
        return obj
    unet = getattr(obj, "unet", None)
    if isinstance(unet, (UNet2DConditionModel, ControlNetModel)):
        return unet
    inner = getattr(obj, "transformer", None) or unet
    what = type(obj).__name__ + (f" (denoiser {type(inner).__name__})" if inner is not None else "")
    raise TypeError(f"tomesd-ext cannot patch {what}: supported are {SUPPORTED}")


def attention_levels(model) -> List[int]:
    """Downsample factors d of the levels that hold transformer blocks (down block i runs at 2**i)."""
    levels = set()
    n = len(model.down_blocks)
    for i, block in enumerate(model.down_blocks):
        if getattr(block, "attentions", None):
            levels.add(2**i)
    mid = getattr(model, "mid_block", None)
    if mid is not None and getattr(mid, "attentions", None):
        levels.add(2 ** (n - 1))
    for i, block in enumerate(getattr(model, "up_blocks", None) or []):
        if getattr(block, "attentions", None):
            levels.add(2 ** (n - 1 - i))
    return sorted(levels)


def resolve_max_downsample(model, max_downsample) -> int:
    """max_downsample as an int: "auto" is the highest-resolution level with transformer blocks."""
    levels = attention_levels(model)
    if not levels:
        raise TypeError(f"{type(model).__name__} has no transformer blocks to merge")
    return levels[0] if max_downsample == "auto" else max_downsample


def _transformer_blocks(model):
    """The spatial BasicTransformerBlocks inside the model's Transformer2DModels."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    for module in model.modules():
        if isinstance(module, Transformer2DModel):
            for block in module.transformer_blocks:
                if isinstance(block, BasicTransformerBlock):
                    yield block


def wrap_processor(attn, wrapper, wrapped: list) -> None:
    """Set `wrapper` (which wraps attn.processor) on `attn`; record (attn, wrapper, inner) in `wrapped`.

    object.__setattr__ leaves an nn.Module processor (IP-Adapter) registered in _modules, so
    state_dict keys and .to() are unchanged while patched.
    """
    inner = attn.processor
    object.__setattr__(attn, "processor", wrapper)
    wrapped.append((attn, wrapper, inner))


def restore_processors(wrapped: list) -> None:
    """Undo wrap_processor for every recorded entry (and empty the list)."""
    import torch

    for attn, wrapper, inner in wrapped:
        if attn.__dict__.get("processor") is not wrapper:
            continue  # the user set another processor since; leave it
        if isinstance(inner, torch.nn.Module):
            del attn.__dict__["processor"]
        else:
            object.__setattr__(attn, "processor", inner)
    wrapped.clear()


class _Patch:
    """Everything one apply_tome changed on a model, so remove() can undo exactly that."""

    def __init__(self, model, opts: ToMeOptions):
        self.model = model
        self.opts = opts
        self.state = ModelState(opts, resolve_max_downsample(model, opts.max_downsample))
        self.handles = []
        self.wrapped = []  # (attention module, wrapper, inner processor)
        self.tracker = None  # ImportanceTracker in importance mode

    def install(self):
        state = self.state
        self.handles.append(self.model.register_forward_pre_hook(self._denoiser_pre_hook, with_kwargs=True))
        if self.opts.mode == "importance":
            self.tracker = ImportanceTracker(state)
            self.handles.extend(self.tracker.install(self.model))
            state.planner = self.tracker.plan
        for block in _transformer_blocks(self.model):
            slot = BlockSlot(state)
            self.handles.append(block.register_forward_pre_hook(_block_reset_hook(slot)))
            self.handles.append(block.register_forward_hook(_block_reset_hook(slot)))
            if self.opts.merge_attn and getattr(block, "attn1", None) is not None:
                self._wrap(block.attn1, slot, self_attention=not block.only_cross_attention)
            if self.opts.merge_crossattn and getattr(block, "attn2", None) is not None:
                self._wrap(block.attn2, slot, self_attention=False)
            if self.opts.merge_mlp and getattr(block, "ff", None) is not None:
                self.handles.append(block.ff.register_forward_pre_hook(_ff_pre_hook(slot), with_kwargs=True))
                self.handles.append(block.ff.register_forward_hook(_ff_post_hook(slot)))

    processor_class = MergedAttnProcessor

    def _wrap(self, attn, slot, self_attention):
        wrap_processor(attn, self.processor_class(attn.processor, slot, self_attention), self.wrapped)

    def remove(self):
        for handle in self.handles:
            handle.remove()
        restore_processors(self.wrapped)
        self.handles.clear()

    def _denoiser_pre_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.state.begin_call(tuple(sample.shape[-2:]) if sample is not None else None, timestep_key(timestep))


def _block_reset_hook(slot: BlockSlot):
    """Before and after each block call: forget the plan (it is per call; frees memory)."""

    def hook(module, args, *output):
        slot.reset()

    return hook


def _ff_pre_hook(slot: BlockSlot):
    def hook(module, args, kwargs):
        x = args[0] if args else None
        plan = slot.get(x) if x is not None and x.ndim == 3 else None
        slot.ff_merged = bool(plan is not None and x.shape[1] == plan.n_tokens)
        if slot.ff_merged:
            return (merge(args[0], plan),) + tuple(args[1:]), kwargs

    return hook


def _ff_post_hook(slot: BlockSlot):
    def hook(module, args, output):
        if slot.ff_merged:
            slot.ff_merged = False
            return unmerge(output, slot.plan)

    return hook


def apply_tome(
    pipe_or_model,
    ratio: float = 0.5,
    *,
    max_downsample: Union[int, str] = "auto",
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    seed=None,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    mode: str = "tome",
    pool_factor: float = 1.4,
    cfg_layout: str = "auto",
    prune_steps: int = 0,
    reuse: str = "block",
    reuse_steps: int = 1,
    min_tokens=None,
):
    """Patch a diffusers pipeline's UNet (or a UNet / ControlNetModel) in place; returns the argument.

    mode="importance" draws destinations from the tokens with the largest CFG difference of the
    previous step (docs/importance.md; pool_factor, cfg_layout, prune_steps apply to it only).
    Applying again replaces the earlier settings. See README "Options" for ranges.
    reuse="level" computes one merge plan per level per step (in the level's first block) and
    reuses it in the level's other blocks; reuse_steps=k keeps plans for k consecutive steps.
    min_tokens: levels with fewer tokens are not merged (None = the measured default, 2048 on
    CPU; 0 = always merge; docs/benchmarks.md "Auto-skip rule").
    """
    opts = ToMeOptions.create(
        ratio=ratio,
        max_downsample=max_downsample,
        sx=sx,
        sy=sy,
        use_rand=use_rand,
        seed=seed,
        merge_attn=merge_attn,
        merge_crossattn=merge_crossattn,
        merge_mlp=merge_mlp,
        mode=mode,
        pool_factor=pool_factor,
        cfg_layout=cfg_layout,
        prune_steps=prune_steps,
        reuse=reuse,
        reuse_steps=reuse_steps,
        min_tokens=min_tokens,
    )
    return install_patch(pipe_or_model, PATCH_ATTR, lambda model: _Patch(model, opts))


def remove_tome(pipe_or_model):
    """Undo apply_tome (a no-op on an unpatched model); returns the argument."""
    return uninstall_patch(pipe_or_model, PATCH_ATTR)


def install_patch(pipe_or_model, attr: str, make_patch):
    """Replace the patch stored under `attr` on the denoiser by make_patch(model), installed."""
    model = _denoiser(pipe_or_model)
    uninstall_patch(model, attr)
    patch = make_patch(model)
    patch.install()
    object.__setattr__(model, attr, patch)
    return pipe_or_model


def uninstall_patch(pipe_or_model, attr: str):
    """Remove the patch stored under `attr` (a no-op when there is none); returns the argument."""
    patch = _denoiser(pipe_or_model).__dict__.pop(attr, None)
    if patch is not None:
        patch.remove()
    return pipe_or_model


def tome_options(pipe_or_model):
    """The ToMeOptions in effect on a patched model, or None."""
    patch = _denoiser(pipe_or_model).__dict__.get(PATCH_ATTR)
    return patch.opts if patch is not None else None
