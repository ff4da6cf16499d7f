"""Where a ComfyUI UNet has attention: the downsample factors of its transformer levels.

Read from the module tree of ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`` (SD 1.x,
SD 2.x, SDXL and variants such as SSD-1B or the refiner): walking ``input_blocks`` the factor
doubles after every ``Downsample``; a block holding a ``SpatialTransformer`` marks its level.
The output path mirrors the input path, so the input blocks and the middle block suffice.
ComfyUI is imported lazily, so this module imports without it.
"""

from __future__ import annotations

from typing import List, Optional


def unet_of(model_patcher):
    """The ``UNetModel`` inside a ComfyUI MODEL (ModelPatcher), or None for any other denoiser."""
    try:
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    except ImportError:
        return None
    base = getattr(model_patcher, "model", None)
    unet = getattr(base, "diffusion_model", None)
    return unet if isinstance(unet, UNetModel) else None


def attention_levels(unet) -> List[int]:
    """Sorted downsample factors d (1, 2, 4, ...) of the levels that hold spatial transformers."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample

    levels = set()
    d = 1
    for block in unet.input_blocks:
        layers = list(block)
        if any(isinstance(layer, SpatialTransformer) for layer in layers):
            levels.add(d)
        if any(isinstance(layer, Downsample) for layer in layers):
            d *= 2
    middle = getattr(unet, "middle_block", None)
    if middle is not None and any(isinstance(layer, SpatialTransformer) for layer in middle):
        levels.add(d)
    return sorted(levels)


def auto_max_downsample(unet) -> Optional[int]:
    """The highest-resolution level with attention (SD1.5: 1, SDXL: 2), None if there is none."""
    levels = attention_levels(unet)
    return levels[0] if levels else None


def transformer_blocks(unet):
    """(attribute path from the BaseModel, BasicTransformerBlock) of every spatial block."""
    from comfy.ldm.modules.attention import BasicTransformerBlock, SpatialTransformer

    for name, module in unet.named_modules():
        if isinstance(module, SpatialTransformer) and type(module) is SpatialTransformer:
            for i, block in enumerate(module.transformer_blocks):
                while hasattr(block, "inner") and not isinstance(block, BasicTransformerBlock):
                    block = block.inner  # a stand-in of ours (block mode), installed while the model is patched
                if isinstance(block, BasicTransformerBlock):
                    yield f"diffusion_model.{name}.transformer_blocks.{i}", block
