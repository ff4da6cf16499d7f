"""VidToMe (Li et al., CVPR 2024) on a ComfyUI MODEL: the video's frames are the latent batch.

``apply_vidtome_patch(model, VidToMeOptions, start_percent, end_percent) -> (MODEL, warning|None)``.

ComfyUI denoises every frame in one UNet call (batch S*F: S = ``len(cond_or_uncond)`` CFG
halves, each holding the F frames, in the order ``cond_or_uncond`` gives). Each block's
self-attention module (``attn1``) is replaced, through ``ModelPatcher.add_object_patch`` on a
clone, by ``VidToMeAttention``, which runs ``core.chunked_temporal_attention``: the chunks of
``core.step_schedule`` (the schedule the diffusers adapter runs one UNet call per chunk) go
through ``core.temporal_attention`` with the original attention module as the attention and the
global token set carried across chunks.
Its input is norm1(x), the tensor the diffusers adapter's processor wrapper receives, so both
adapters merge the same tokens. The step key (the UNet's timestep), the latent size and the
sigma window come from the same ``DiffusionModelWrapper`` and ``MergeRuntime`` as the ToMe node's.
"""

from __future__ import annotations

from typing import Optional, Tuple

from ..core import MergeRuntime, VidToMeOptions, VidToMePolicy
from .discovery import transformer_blocks, unet_of
from .patching import PatchState, StandIn, patched_clone, sigma_range, unsupported_reason


def vidtome_state(opts: VidToMeOptions, sigma_start: float = float("inf"), sigma_end: float = 0.0) -> PatchState:
    """The shared state of a VidToMe patch: a MergeRuntime with the VidToMe policy."""
    return PatchState(MergeRuntime(VidToMePolicy(opts), opts.max_downsample, sigma_start, sigma_end))


class VidToMeAttention(StandIn):
    """Stands in for a block's ``attn1`` (ComfyUI ``CrossAttention``); x: (S*F, N, C) = norm1(x).

    Merges only true self-attention at the merged levels while the sampling window is active;
    anything else (a cross-attention attn1, a mask, another node's shortened context) runs the
    original module unchanged.
    """

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006 (ComfyUI's signature)
        rt = self.state.runtime
        self_attention = (context is None or context is x) and (value is None or value is x)
        samples = len(transformer_options.get("cond_or_uncond") or ()) or 1
        if (
            not rt.active
            or not self_attention
            or mask is not None
            or x.ndim != 3
            or x.shape[0] % samples
            or rt.level(x.shape[1]) is None
        ):
            return self.inner(x, context=context, value=value, mask=mask, transformer_options=transformer_options)

        def attention(tokens):
            return self.inner(tokens, transformer_options=transformer_options)

        return rt.policy.chunked_attention(x, samples, attention, rt.step_key)


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
    state = vidtome_state(opts, *sigma_range(model, start_percent, end_percent))

    m = patched_clone(model, state)
    for path, _block in blocks:
        key = path + ".attn1"
        m.add_object_patch(key, VidToMeAttention(StandIn.unwrap(m.get_model_object(key)), state))
    return m, None
