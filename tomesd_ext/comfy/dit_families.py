"""Where ComfyUI's image transformers (comfy/ldm, v0.8.0) keep what DiT merging attaches to.

A family is a few facts, no algorithm (the algorithm is core/dit.py): which ``patches_replace["dit"]``
blocks the model runs, in order; where the image tokens sit in a block's ``args["img"]``; where its
rotary table ``args["pe"]`` holds them; the patch size that turns the latent into the token grid.

- Flux.1 and Flux.2 (``comfy.ldm.flux.model.Flux``; Flux.2 is the same class with global
  modulation): double blocks take ``img`` (image tokens, then reference-image tokens) beside
  ``txt``; single blocks take ``img = [txt, image, references]``. ``pe``: (B, 1, L, D/2, 2, 2)
  over [txt, image, references].
- SD3 / SD3.5 (``comfy.ldm.modules.diffusionmodules.mmdit.MMDiT``): joint blocks take ``img``
  (image tokens) beside ``txt``; positions are added at the input (no ``pe``).
- Qwen-Image (``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel``): like Flux's double
  blocks; a call with reference latents is not merged (their per-token timestep index would move).

PixArt (``pixartms.PixArtMS``) and Lumina2 / Z-Image (``lumina.model.NextDiT``) run their blocks
without ``patches_replace`` in v0.8.0: dit_hooks.py attaches to them (hooks for the call only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple


@dataclass(frozen=True)
class Family:
    """key: (diffusion model) -> the core family key (DIT_DEFAULTS); blocks: (diffusion model) ->
    the ``patches_replace["dit"]`` keys (kind, index) in execution order; joined: the block kinds
    whose ``img`` is [txt, image...] (the image span starts after the text); pe_dim: the sequence
    dimension of ``args["pe"]`` (None: no rotary table); refs: reference tokens after the image
    span may be merged around (False: a call with more tokens than the grid is not merged)."""

    label: str
    key: Callable
    blocks: Callable
    joined: Tuple[str, ...]
    pe_dim: Optional[int]
    refs: bool


def _flux_blocks(dm):
    return [("double_block", i) for i in range(len(dm.double_blocks))] + [
        ("single_block", i) for i in range(len(dm.single_blocks))
    ]


def _doubles(name):
    return lambda dm: [("double_block", i) for i in range(len(getattr(dm, name)))]


FLUX = Family("Flux", lambda dm: "flux2" if dm.params.global_modulation else "flux", _flux_blocks,
              ("single_block",), 2, True)
SD3 = Family("SD3 (MMDiT)", lambda dm: "sd3", _doubles("joint_blocks"), (), None, True)
QWEN = Family("Qwen-Image", lambda dm: "qwen-image", _doubles("transformer_blocks"), (), 2, False)

SUPPORTED_DITS = "Flux.1, Flux.2, SD3 / SD3.5 (MMDiT), Qwen-Image, PixArt-α/Σ, Lumina2 / Z-Image"


def family_of(diffusion_model) -> Optional[Family]:
    """The family of a ComfyUI diffusion model (by class, subclasses included), or None."""
    try:
        from comfy.ldm.flux.model import Flux
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
        from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    except ImportError:
        return None
    for cls, family in ((Flux, FLUX), (MMDiT, SD3), (QwenImageTransformer2DModel, QWEN)):
        if isinstance(diffusion_model, cls):
            return family
    return None


def token_grid(latent_shape, patch_size: int) -> Optional[Tuple[int, int]]:
    """(h, w) image-token grid of a latent (..., H, W) patchified by patch_size (padded up)."""
    if len(latent_shape) < 4:
        return None
    h, w = latent_shape[-2], latent_shape[-1]
    return -(-h // patch_size), -(-w // patch_size)
