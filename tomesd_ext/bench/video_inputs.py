"""Video inputs of the bench for video transformers: clips whose frames carry real structure,
mapped into a video VAE's latent space without a VAE, then noised like the image inputs.

- ``pan``: the skimage astronaut photo seen through a window that moves PAN_PX pixels right per
  frame (a camera pan: neighbouring frames are shifted copies of each other);
- ``gif``: skimage's animated GIF (24 frames, played forward then backward to any length);
- ``noise``: pure Gaussian latents.
Pixel frames (F, 3, H, W) become latents (C, (F - 1) / temporal + 1, H / spatial, W / spatial) as
a causal video VAE groups them: latent frame 0 is pixel frame 0, latent frame k the mean of pixel
frames (k - 1) * temporal + 1 ... k * temporal; each is mapped by latent_map.rgb_to_channels
(the spatial-average of each spatial x spatial patch through the fixed projection).
"""

from __future__ import annotations

import numpy as np
import torch

from .inputs import BenchInput, fit_image, load_photo
from .latent_map import rgb_to_channels

VIDEO_INPUT_KINDS = ("pan", "gif", "noise")
PAN_PHOTO = "astronaut"
PAN_PX = 4  # pixels per frame: one 16 px Wan/HunyuanVideo token per 4-frame latent group


def latent_frames(frames: int, temporal: int) -> int:
    """Latent frames of a clip of ``frames`` pixel frames (a causal VAE: 1 + (frames - 1) / temporal)."""
    return (frames - 1) // temporal + 1


def clip_frames(kind: str, frames: int, height: int, width: int) -> torch.Tensor:
    """Pixel frames (frames, 3, height, width) in [-1, 1] of clip ``kind`` ("pan" or "gif")."""
    if kind == "pan":
        wide = load_photo(PAN_PHOTO, height, width + PAN_PX * (frames - 1))
        return torch.stack([wide[:, :, PAN_PX * i : PAN_PX * i + width] for i in range(frames)])
    if kind == "gif":
        from ..video import read_frames
        from .video.clips import gif_path

        gif = [fit_image(np.asarray(f), height, width) for f in read_frames(gif_path(), max_frames=10000).frames]
        cycle = gif + gif[-2:0:-1]
        return torch.stack([cycle[i % len(cycle)] for i in range(frames)])
    raise ValueError(f"unknown video input {kind!r}; choose from {', '.join(VIDEO_INPUT_KINDS)}")


def frames_to_latents(pixels: torch.Tensor, vae: dict) -> torch.Tensor:
    """(F, 3, H, W) pixel frames -> (C, F', H / spatial, W / spatial) latents (module docstring)."""
    t = vae["temporal"]
    groups = [pixels[:1]] + [pixels[1 + k * t : 1 + (k + 1) * t] for k in range((pixels.shape[0] - 1) // t)]
    means = torch.stack([g.mean(0) for g in groups])
    return rgb_to_channels(means, vae["channels"], vae["spatial"]).permute(1, 0, 2, 3)


def make_video_input(kind: str, n_videos: int, height: int, width: int, frames: int, vae: dict, seed: int) -> BenchInput:
    """Input ``kind`` for n_videos clips: x0 and noise (n, C, F', H / spatial, W / spatial)."""
    if kind not in VIDEO_INPUT_KINDS:
        raise ValueError(f"unknown video input {kind!r}; choose from {', '.join(VIDEO_INPUT_KINDS)}")
    shape = (n_videos, vae["channels"], latent_frames(frames, vae["temporal"]), height // vae["spatial"], width // vae["spatial"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if kind == "noise":
        return BenchInput(kind, None, noise)
    x0 = frames_to_latents(clip_frames(kind, frames, height, width), vae)
    return BenchInput(kind, x0.unsqueeze(0).expand(n_videos, *x0.shape).contiguous(), noise)
