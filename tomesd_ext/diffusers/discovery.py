"""Where a diffusers denoiser has what token merging attaches to (SD 1.x, SD 2.x, SDXL UNets and
ControlNets; image transformers through dit_families.py): the denoiser of a pipeline, its spatial
transformer blocks and their levels."""

from __future__ import annotations

import sys
from typing import List

import torch

SUPPORTED = "UNet2DConditionModel (SD 1.x, SD 2.x, SDXL and their img2img/inpaint/ControlNet pipelines) and ControlNetModel"
MOTION = "AnimateDiff: UNetMotionModel and the AnimateDiff pipelines holding one as unet"


def compiled_original(module):
    """The module a ``torch.compile``d wrapper runs (``OptimizedModule._orig_mod``), else module
    itself: a patch goes on the original module, whose hooks and processors the compiled code
    calls (and guards, see dit.py and docs/stacking.md)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    while eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        module = module._orig_mod
    return module


def _parts(obj):
    """obj (original module) and its unet, transformer and transformer_2 (original modules or None)."""
    return [compiled_original(p) if p is not None else None
            for p in (obj, *(getattr(obj, name, None) for name in ("unet", "transformer", "transformer_2")))]


def denoiser_of(obj, transformers: bool = True, motion: bool = False):
    """The denoiser to patch: obj itself, or a pipeline's `unet` (or, with ``transformers``, an
    image transformer of dit_families.FAMILIES, or a pipeline's `transformer`, or its
    `transformer_2` when it has no `transformer`: Wan 2.2 with only the low-noise expert; with
    ``motion``, a UNetMotionModel of AnimateDiff); a torch.compile'd module counts as the module it
    compiled. TypeError naming what is supported."""
    from diffusers import ControlNetModel, UNet2DConditionModel, UNetMotionModel

    from .dit_families import SUPPORTED_DITS, family_of

    def fits(m):
        return (isinstance(m, (UNet2DConditionModel, ControlNetModel)) or (motion and isinstance(m, UNetMotionModel))
                or (transformers and family_of(m) is not None))

    me, unet, transformer, transformer_2 = _parts(obj)
    candidates = (me, unet, transformer) if transformer is not None else (me, unet, transformer_2)
    for candidate in candidates:
        if candidate is not None and fits(candidate):
            return candidate
    inner = next((m for m in (transformer, unet, transformer_2) if m is not None), None)
    what = type(obj).__name__ + (f" (denoiser {type(inner).__name__})" if inner is not None else "")
    if me is not obj:
        what = f"{type(obj).__name__} (torch.compile of {type(me).__name__})"
    supported = SUPPORTED + (f"; transformers: {SUPPORTED_DITS}" if transformers else " (this method has no transformer support)")
    supported += f"; {MOTION}" if motion else " (this method has no AnimateDiff support)"
    nets = getattr(obj, "nets", None)
    if isinstance(nets, torch.nn.ModuleList) and any(fits(n) for n in nets):  # Flux/SD MultiControlNetModel
        what += " (several ControlNets: patch each of its .nets)"
    raise TypeError(f"tomesd-ext cannot patch {what}: supported are {supported}")


def second_denoisers(obj) -> list:
    """Further denoisers of a pipeline that apply_tome patches beside the first (``denoiser_of``):
    the low-noise expert ``transformer_2`` of two-expert pipelines (Wan 2.2 A14B), when the
    pipeline has a ``transformer`` too."""
    from .dit_families import family_of

    _me, _unet, transformer, second = _parts(obj)
    return [second] if transformer is not None and second is not None and family_of(second) is not None else []


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


def transformer_blocks(model):
    """The spatial BasicTransformerBlocks inside the model's Transformer2DModels (in a
    UNetMotionModel: not the motion modules' temporal blocks, which are no Transformer2DModel)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    for module in model.modules():
        if isinstance(module, Transformer2DModel):
            for block in module.transformer_blocks:
                if isinstance(block, BasicTransformerBlock):
                    yield block


def blocks_in_order(model):
    """(downsample factor, block) of every block of ``transformer_blocks`` in execution order:
    down blocks (block i at 2**i), the mid block, up blocks (block j at 2**(n - 1 - j));
    per-block settings number the blocks in this order."""
    n = len(model.down_blocks)
    level = {}
    parts = [(2**i, b) for i, b in enumerate(model.down_blocks)]
    mid = getattr(model, "mid_block", None)
    parts += [(2 ** (n - 1), mid)] if mid is not None else []
    parts += [(2 ** (n - 1 - j), b) for j, b in enumerate(getattr(model, "up_blocks", None) or [])]
    rank = {}
    for d, part in parts:
        for m in part.modules():
            rank.setdefault(id(m), len(rank))
            level.setdefault(id(m), d)
    blocks = list(transformer_blocks(model))
    blocks.sort(key=lambda b: rank.get(id(b), len(rank)))
    return [(level.get(id(b), 1), b) for b in blocks]


def self_attentions(model):
    """(index, attn1) of every block whose attn1 is self-attention."""
    for i, block in enumerate(transformer_blocks(model)):
        attn = getattr(block, "attn1", None)
        if attn is not None and not block.only_cross_attention:
            yield i, attn
