"""VidToMe (Li et al., CVPR 2024) on a ComfyUI MODEL: the video's frames are the latent batch.

``apply_vidtome_patch(model, VidToMeOptions, start_percent, end_percent) -> (MODEL, warning|None)``.

ComfyUI denoises every frame in one UNet call (batch S*F: S = ``len(cond_or_uncond)`` CFG
halves, each holding the F frames, in the order ``cond_or_uncond`` gives). Each block's
self-attention module (``attn1``) is replaced, through ``ModelPatcher.add_object_patch`` on a
clone, by ``VidToMeAttention``, which runs ``core.chunked_temporal_attention``: the frames are
split into VidToMe's random chunks of this step and every chunk goes through
``core.temporal_attention`` (the function the diffusers adapter calls per chunk UNet call), with
the original attention module as the attention and the global token set carried across chunks.
Its input is norm1(x), the tensor the diffusers adapter's processor wrapper receives, so both
adapters merge the same tokens. The step key (the UNet's timestep), the latent size and the
sigma window come from the same ``DiffusionModelWrapper`` as the ToMe node's.
"""

from __future__ import annotations

from typing import Optional, Tuple

from ..core import VidToMeOptions, chunked_temporal_attention, merges_level
from .geometry import transformer_blocks, unet_of
from .patch import patched_clone, sigma_range, unsupported_reason
from .patches import StandIn
from .state import SamplingWindow


class ComfyVidToMeState(SamplingWindow):
    """VidToMeOptions plus the per-call facts (latent size, step key, sigma window)."""

    def __init__(self, opts: VidToMeOptions, sigma_start: float = float("inf"), sigma_end: float = 0.0):
        super().__init__(sigma_start, sigma_end)
        self.opts = opts


class VidToMeAttention(StandIn):
    """Stands in for a block's ``attn1`` (ComfyUI ``CrossAttention``); x: (S*F, N, C) = norm1(x).

    Merges only true self-attention at the merged levels while the sampling window is active;
    anything else (a cross-attention attn1, a mask, another node's shortened context) runs the
    original module unchanged.
    """

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006 (ComfyUI's signature)
        st = self.state
        self_attention = (context is None or context is x) and (value is None or value is x)
        samples = len(transformer_options.get("cond_or_uncond") or ()) or 1
        if (
            not st.active
            or not self_attention
            or mask is not None
            or x.ndim != 3
            or x.shape[0] % samples
            or not merges_level(x.shape[1], st.latent_hw, st.opts.max_downsample)
        ):
            return self.inner(x, context=context, value=value, mask=mask, transformer_options=transformer_options)

        def attention(tokens):
            return self.inner(tokens, transformer_options=transformer_options)

        return chunked_temporal_attention(x, samples, attention, st.opts, st.step_key)


def apply_vidtome_patch(
    model, opts: VidToMeOptions, start_percent: float = 0.0, end_percent: float = 1.0
) -> Tuple[object, Optional[str]]:
    """Return (patched clone, None), or (``model`` unchanged, reason) when it cannot be patched.

    opts: validated ``VidToMeOptions`` (a fixed seed: ``VidToMeOptions.create`` resolves None).
    Any earlier tomesd-ext patch on ``model`` (ToMe or VidToMe) is replaced, not stacked.
    """
    unet = unet_of(model)
    if unet is None:
        return model, unsupported_reason(model, " (VidToMe)")
    blocks = [(path, block) for path, block in transformer_blocks(unet) if not getattr(block, "disable_self_attn", False)]
    if not blocks:
        return model, f"tomesd-ext: token merging skipped (VidToMe), {type(unet).__name__} has no self-attention blocks"
    sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
    state = ComfyVidToMeState(opts, sigma_start, sigma_end)

    m = patched_clone(model, state)
    for path, _block in blocks:
        key = path + ".attn1"
        m.add_object_patch(key, VidToMeAttention(StandIn.unwrap(m.get_model_object(key)), state))
    return m, None
