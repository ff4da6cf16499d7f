"""The "sharpened attention" fidelity variant of a random-weight UNet.

With plain random weights self-attention is almost uniform, so merging tokens barely changes
the output and methods cannot be ranked. Tying each self-attention's key projection to its
query projection and scaling both makes the attention peaked (a token attends to tokens like
itself), and the error of merged vs. unmerged models then rises with the merge ratio
(see docs/bench.md, "Sharpened attention"). It ranks methods; it does not judge image quality.
"""

import torch
from diffusers.models.attention import BasicTransformerBlock


def sharpen_self_attention(unet, scale=2.0):
    """Tie and scale the self-attention projections of every transformer block, in place.

    For each ``BasicTransformerBlock.attn1`` in ``unet`` (any module: a UNet, a ControlNet):
    ``to_q.weight <- scale * to_q.weight`` and ``to_k.weight <- to_q.weight`` (a copy, not a
    shared tensor); biases, if any, likewise. Cross-attention (``attn2``) is untouched.
    Deterministic given the weights. Returns ``unet``. Raises ValueError if the block's
    projections are fused (call it before ``fuse_qkv_projections``) or none were found.
    """
    found = 0
    with torch.no_grad():
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
