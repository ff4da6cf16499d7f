"""The "sharpened attention" fidelity variant of a random-weight UNet or diffusion transformer.

With plain random weights self-attention is almost uniform, so merging tokens barely changes
the output and methods cannot be ranked. Tying each self-attention's key projection to its
query projection and scaling both makes the attention peaked (a token attends to tokens like
itself), and the error of merged vs. unmerged models then rises with the merge ratio
(see docs/bench.md, "Sharpened attention"). It ranks methods; it does not judge image quality.

Diffusion transformers: the image-stream projections of every self/joint attention are tied
(``to_q``/``to_k``; Flux.2's fused single-block ``to_qkv_mlp_proj``: its key rows := its query
rows); text-stream projections (``add_q_proj``/``add_k_proj``) and text-only blocks (Z-Image's
``context_refiner``) are left alone. With qk RMSNorm (Flux, Flux.2, SD3.5, Qwen-Image, Z-Image)
a scale on the projection is normalised away, so only the tie applies (``norm_k`` := ``norm_q``);
a token's logit with itself is then sqrt(head_dim). Z-Image is single-stream: its projections
act on text tokens too.

Video transformers (Wan, LTX-Video, HunyuanVideo): exactly the self-attentions that merging acts
on, as the family table of ``tomesd_ext.diffusers.dit_families`` names them (Wan ``blocks.*.attn1``,
LTX ``transformer_blocks.*.attn1``, HunyuanVideo ``transformer_blocks.*.attn`` (image stream;
``add_*_proj`` untouched) and ``single_transformer_blocks.*.attn`` (single stream: text too));
cross-attentions and HunyuanVideo's text token refiner are left alone. All three have qk
RMSNorm (LTX's without a weight): tie only.
"""

import torch
from diffusers.models.attention import BasicTransformerBlock

_TEXT_ONLY = ("context_refiner",)  # Z-Image: blocks that see only caption tokens


def _tie_dit_attention(attn, scale):
    """Tie one DiT attention's key projection (and qk norm) to its query's; True if it did."""
    if getattr(attn, "fused_projections", False):
        raise ValueError("attention projections are fused; sharpen before fuse_qkv_projections")
    qk_norm = getattr(attn, "norm_q", None) is not None  # RMSNorm (with or without a weight) cancels a scale
    if hasattr(attn, "to_qkv_mlp_proj"):  # Flux.2 single block: rows [q | k | v | mlp]
        inner = attn.inner_dim
        for p in (attn.to_qkv_mlp_proj.weight, attn.to_qkv_mlp_proj.bias):
            if p is not None:
                if not qk_norm:
                    p[:inner].mul_(scale)
                p[inner : 2 * inner].copy_(p[:inner])
    elif isinstance(getattr(attn, "to_q", None), torch.nn.Linear) and isinstance(getattr(attn, "to_k", None), torch.nn.Linear):
        for q, k in ((attn.to_q.weight, attn.to_k.weight), (attn.to_q.bias, attn.to_k.bias)):
            if q is not None and k is not None:
                if not qk_norm:
                    q.mul_(scale)
                k.copy_(q)
    else:
        return False
    if qk_norm and getattr(attn.norm_k, "weight", None) is not None:
        attn.norm_k.weight.copy_(attn.norm_q.weight)
    return True


def _sharpen_video(model, family, scale):
    """Tie the attentions the merging family table names in every block of each block list."""
    found = 0
    for blocks in family.lists:
        for block in getattr(model, blocks.name):
            for attr in blocks.attentions:
                found += _tie_dit_attention(getattr(block, attr), scale)
    return found


def _sharpen_dit(model, scale):
    from ..diffusers.dit_families import VIDEO_FAMILIES, family_of

    family = family_of(model)
    if family is not None and family in VIDEO_FAMILIES.values():
        return _sharpen_video(model, family, scale)
    found = 0
    for name, module in model.named_modules():
        if name.split(".")[0] in _TEXT_ONLY or getattr(module, "is_cross_attention", False):
            continue
        if hasattr(module, "to_qkv_mlp_proj") or (hasattr(module, "processor") and hasattr(module, "to_q")):
            found += _tie_dit_attention(module, scale)
    return found


def sharpen_self_attention(unet, scale=2.0):
    """Tie and scale the self-attention projections of every transformer block, in place.

    For each ``BasicTransformerBlock.attn1`` in ``unet`` (any module: a UNet, a ControlNet,
    PixArt): ``to_q.weight <- scale * to_q.weight`` and ``to_k.weight <- to_q.weight`` (a copy,
    not a shared tensor); biases, if any, likewise. Cross-attention (``attn2``) is untouched.
    A model without such blocks is treated as a diffusion transformer (module docstring): its
    image self/joint attentions are tied, scaled only when they have no qk norm.
    Deterministic given the weights. Returns ``unet``. Raises ValueError if the projections are
    fused (call it before ``fuse_qkv_projections``) or no self-attention was found.
    """
    found = 0
    with torch.no_grad():
        if not any(isinstance(m, BasicTransformerBlock) for m in unet.modules()):
            if not _sharpen_dit(unet, scale):
                raise ValueError(
                    f"no self-attention found in {type(unet).__name__}: expected BasicTransformerBlock.attn1 "
                    "or diffusion-transformer attentions with to_q/to_k (or Flux.2's to_qkv_mlp_proj)"
                )
            return unet
        for module in unet.modules():
            if not isinstance(module, BasicTransformerBlock):
                continue
            attn = module.attn1
            if getattr(attn, "is_cross_attention", False):
                continue
            if getattr(attn, "fused_projections", False):
                raise ValueError("self-attention projections are fused; sharpen before fusing")
            attn.to_q.weight.mul_(scale)
            attn.to_k.weight.copy_(attn.to_q.weight)
            if attn.to_q.bias is not None and attn.to_k.bias is not None:
                attn.to_q.bias.mul_(scale)
                attn.to_k.bias.copy_(attn.to_q.bias)
            found += 1
    if not found:
        raise ValueError("no self-attention (BasicTransformerBlock.attn1) found")
    return unet
