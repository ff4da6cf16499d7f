"""One denoiser call of each diffusion transformer family, as its diffusers pipeline makes it.

Every family is called with VAE-space latents (B, C, h, w) (h, w = pixels / 8, even: the
transformers see a 2x2 patch per token, so a 1024 px image gives 64 x 64 = 4096 image tokens)
and a scheduler timestep in [0, 1000]; ``dit_call`` returns (B, C, h, w) in one convention:
the flow velocity v = noise - x0 for the rectified-flow families (Flux.1, Flux.2, SD3,
Qwen-Image, Z-Image; sigma = timestep / 1000, x_t = (1 - sigma) x0 + sigma noise) and the
noise epsilon for PixArt (DDPM timesteps; its learned-variance channels are dropped).

What each pipeline passes (diffusers 0.42):
- Flux.1: latents packed (B, h/2 * w/2, 4C), img_ids (N, 3) = (0, row, col), txt_ids (L, 3)
  zeros, pooled CLIP (B, 768), timestep sigma, guidance 3.5 (guidance-distilled, no true CFG).
- Flux.2: the same packing (32 VAE channels -> 128), 4-axis ids (t, h, w, l): image (0, row,
  col, 0), text (0, 0, 0, index); no pooled embedding; guidance 4.0.
- SD3: latents (B, 16, h, w), joint text (B, 77 + 256, 4096), pooled (B, 2048), timestep sigma * 1000.
- PixArt-Sigma: latents (B, 4, h, w), T5 (B, 300, 4096) with its attention mask, timestep t,
  ``added_cond_kwargs`` resolution and aspect ratio None (not used by Sigma).
- Qwen-Image: Flux's packing, text (B, L, 3584) with its mask, img_shapes [[(1, h/2, w/2)]] * B,
  timestep sigma.
- Z-Image: lists: x[i] (16, 1, h, w), cap_feats[i] (L, 2560), t = 1 - sigma; its output is
  -v (the pipeline negates it), negated back here.
Video transformers (Wan, LTX-Video, HunyuanVideo) take (B, C, F, h, w) latents: video_call.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from .video_call import VIDEO_CHANNELS, video_call

LATENT_CHANNELS = {"flux": 16, "flux2": 32, "sd3": 16, "pixart": 4, "qwen-image": 16, "z-image": 16, **VIDEO_CHANNELS}
FLOW = ("flux", "flux2", "sd3", "qwen-image", "z-image")
GUIDANCE = {"flux": 3.5, "flux2": 4.0}  # distilled guidance embedded by Flux.1-dev / Flux.2-dev


def pack2x2(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) tokens, features ordered (C, dy, dx), as the pipelines pack."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even (2x2 patches)")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack2x2(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack2x2: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def _grid_ids(h: int, w: int, axes: int) -> torch.Tensor:
    """(h*w, axes) ids of a token grid: row in axis 1, column in axis 2, zeros elsewhere."""
    ids = torch.zeros(h, w, axes)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, axes)


def text_conditioning(family: str, config, batch: int, text_tokens: int, seed: int, halves: int = 1) -> dict:
    """Seeded N(0, 1) text conditioning for ``batch`` rows: ``halves`` = 2 gives [uncond, cond]
    halves (each half's rows equal). Returns {"text": (B, L, D), "pooled": (B, P) or None}."""
    dims = {"flux": "joint_attention_dim", "flux2": "joint_attention_dim", "sd3": "joint_attention_dim",
            "pixart": "caption_channels", "qwen-image": "joint_attention_dim", "z-image": "cap_feat_dim",
            "wan": "text_dim", "ltx-video": "caption_channels", "hunyuan-video": "text_embed_dim"}
    gen = torch.Generator().manual_seed(seed + 7)
    per_half = batch // halves

    def draw(*shape):
        return torch.randn(halves, 1, *shape, generator=gen).repeat_interleave(per_half, 0).flatten(0, 1)

    text = draw(text_tokens, config[dims[family]])
    pooled = draw(config["pooled_projection_dim"]) if family in ("flux", "sd3", "hunyuan-video") else None
    return {"text": text, "pooled": pooled}


def dit_call(model, family: str, latents: torch.Tensor, timestep, text: torch.Tensor, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One forward of ``model`` (a transformer of ``family``) on latents (B, C, h, w) at scheduler
    ``timestep`` (float in [0, 1000]); text (B, L, D), pooled (B, P) for flux/sd3/hunyuan-video. Returns
    (B, C, h, w): velocity for flow families, epsilon for PixArt (module docstring). Video
    families take and return (B, C, F, h, w) (video_call)."""
    if family in VIDEO_CHANNELS:
        return video_call(model, family, latents, timestep, text, pooled)
    b, c, h, w = latents.shape
    if c != LATENT_CHANNELS[family]:
        raise ValueError(f"{family} takes {LATENT_CHANNELS[family]} latent channels, got {c}")
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even (2x2 patches)")
    dev, dt = latents.device, latents.dtype
    sigma = torch.full((b,), float(timestep) / 1000, device=dev, dtype=dt)
    text = text.to(dev, dt)
    if family in ("flux", "flux2", "qwen-image"):
        tokens = pack2x2(latents)
        kwargs = {"hidden_states": tokens, "encoder_hidden_states": text, "timestep": sigma}
        if family == "qwen-image":
            kwargs["encoder_hidden_states_mask"] = torch.ones(text.shape[:2], device=dev, dtype=torch.long)
            kwargs["img_shapes"] = [[(1, h // 2, w // 2)]] * b
        else:
            axes = 3 if family == "flux" else 4
            kwargs["img_ids"] = _grid_ids(h // 2, w // 2, axes).to(dev, dt)
            txt_ids = torch.zeros(text.shape[1], axes)
            if family == "flux2":
                txt_ids[:, 3] = torch.arange(text.shape[1])
            kwargs["txt_ids"] = txt_ids.to(dev, dt)
            if model.config.guidance_embeds:
                kwargs["guidance"] = torch.full((b,), GUIDANCE[family], device=dev, dtype=dt)
            if family == "flux":
                kwargs["pooled_projections"] = pooled.to(dev, dt)
        out = model(**kwargs, return_dict=False)[0]
        return unpack2x2(out, h, w)
    if family == "sd3":
        return model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled.to(dev, dt),
                     timestep=sigma * 1000, return_dict=False)[0]
    if family == "pixart":
        t = torch.full((b,), int(timestep), device=dev, dtype=torch.long)
        out = model(latents, encoder_hidden_states=text, timestep=t,
                    encoder_attention_mask=torch.ones(text.shape[:2], device=dev, dtype=dt),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        return out[:, :c] if out.shape[1] == 2 * c else out
    if family == "z-image":
        x = [latents[i].unsqueeze(1) for i in range(b)]
        out = model(x, 1 - sigma, [text[i] for i in range(b)], return_dict=False)[0]
        return -torch.stack([o.squeeze(1) for o in out])
    raise KeyError(f"unknown family {family!r}; choose one of {', '.join(LATENT_CHANNELS)}")
