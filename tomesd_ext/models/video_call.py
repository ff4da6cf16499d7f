"""One denoiser call of each video transformer family, as its diffusers pipeline makes it.

Latents are (B, C, F, h, w) VAE-space video latents (F latent frames) at a scheduler timestep
in [0, 1000]; the output is (B, C, F, h, w), the flow velocity v = noise - x0 (all three are
rectified-flow models: sigma = timestep / 1000). What each pipeline passes (diffusers 0.42):
- Wan 2.1: latents as they are, timestep t = sigma * 1000 per row, umT5 text (B, 512, 4096).
  (The pipeline makes the cond and uncond calls one row each; the bench one call of batch 2.)
- LTX-Video: latents packed (B, F*h*w, C) (patch 1), T5 text (B, 128, 4096) with its mask,
  t per row, num_frames/height/width of the latent and rope_interpolation_scale
  (temporal compression / frame rate 25, spatial compression, spatial compression).
- HunyuanVideo: latents as they are, text (B, 256, 4096) with its mask, pooled CLIP (B, 768),
  t per row, embedded guidance 6.0 * 1000 (guidance-distilled: no CFG batch).
"""

from __future__ import annotations

from typing import Optional

import torch

from .video_configs import LTX_VAE

VIDEO_CHANNELS = {"wan": 16, "ltx-video": 128, "hunyuan-video": 16}
HUNYUAN_GUIDANCE = 6.0  # the HunyuanVideo pipeline's default embedded guidance
LTX_FRAME_RATE = 25  # the LTX pipeline's default frame_rate


def video_call(model, family: str, latents: torch.Tensor, timestep, text: torch.Tensor,
               pooled: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
               frame_rate: float = LTX_FRAME_RATE) -> torch.Tensor:
    """One forward of video transformer ``model`` of ``family`` on latents (B, C, F, h, w) at
    ``timestep`` (float in [0, 1000]); text (B, L, D), pooled (B, P) for HunyuanVideo, mask
    (B, L) of the text's real tokens (LTX-Video, HunyuanVideo; default all ones), frame_rate of
    LTX-Video's rotary scale. Returns (B, C, F, h, w)."""
    if latents.ndim != 5:
        raise ValueError(f"{family} takes video latents (B, C, F, h, w), got shape {tuple(latents.shape)}")
    b, c, f, h, w = latents.shape
    channels = getattr(getattr(model, "config", None), "in_channels", None) or VIDEO_CHANNELS[family]
    if c != channels:  # Wan 2.2 TI2V-5B: 48
        raise ValueError(f"{family} takes {channels} latent channels, got {c}")
    dev, dt = latents.device, latents.dtype
    t = torch.full((b,), float(timestep), device=dev, dtype=dt)
    text = text.to(dev, dt)
    mask = torch.ones(text.shape[:2], device=dev, dtype=dt) if mask is None else mask.to(dev, dt)
    if family == "wan":
        return model(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    if family == "hunyuan-video":
        guidance = torch.full((b,), HUNYUAN_GUIDANCE * 1000, device=dev, dtype=dt)
        return model(hidden_states=latents, timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask,
                     pooled_projections=pooled.to(dev, dt), guidance=guidance, return_dict=False)[0]
    if family == "ltx-video":
        tokens = latents.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)
        scale = (LTX_VAE["temporal"] / frame_rate, LTX_VAE["spatial"], LTX_VAE["spatial"])
        out = model(hidden_states=tokens, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                    num_frames=f, height=h, width=w, rope_interpolation_scale=scale, return_dict=False)[0]
        return out.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)
    raise KeyError(f"unknown video family {family!r}; choose one of {', '.join(VIDEO_CHANNELS)}")
