"""Bench inputs: pure-noise latents and real-photo latents noised at a scheduler timestep.

Photos come from skimage.data (bundled, no download), centre-cropped to a square and resized
to the resolution. They become latents through the model's VAE when it has trained weights,
otherwise through the fixed linear map of latent_map.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
INPUT_KINDS = ("photo", "noise") + PHOTOS  # "photo" = the photos in turn, one per image


def load_photo(name: str, resolution: int, width: Optional[int] = None) -> torch.Tensor:
    """skimage.data photo `name` as (3, resolution, width) float32 in [-1, 1] (width None: square),
    centre-cropped to that aspect ratio."""
    from skimage import data

    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
    return fit_image(getattr(data, name)()[..., :3], resolution, width or resolution)


def fit_image(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(h, w, 3) uint8 -> (3, height, width) float32 in [-1, 1]: the centred crop of that aspect
    ratio, resized (anti-aliased)."""
    from skimage.transform import resize

    h, w = image.shape[:2]
    ch, cw = (h, round(h * width / height)) if w * height >= h * width else (round(w * height / width), w)
    top, left = (h - ch) // 2, (w - cw) // 2
    image = image[top : top + ch, left : left + cw]
    image = resize(image, (height, width), anti_aliasing=True, preserve_range=True) / 255.0
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1) * 2 - 1


@dataclass
class BenchInput:
    """One input of the bench: `name` (photo/noise/...), clean latents x0 (n, 4, h, w) or None
    for pure noise, and the Gaussian noise (n, 4, h, w) drawn from the run's seed."""

    name: str
    x0: Optional[torch.Tensor]
    noise: torch.Tensor

    def noised(self, scheduler, timestep) -> torch.Tensor:
        """x_t at `timestep`: pure noise (times the scheduler's initial sigma) for "noise"."""
        if self.x0 is None:
            return self.noise * float(getattr(scheduler, "init_noise_sigma", 1.0))
        t = torch.as_tensor([int(timestep)])
        return scheduler.add_noise(self.x0, self.noise, t)


def make_input(
    kind: str, n_images: int, resolution: int, seed: int, encode: Callable[[torch.Tensor], torch.Tensor],
    latent_channels: int = 4,
) -> BenchInput:
    """Input `kind` for n_images images. encode: images (n, 3, H, W) in [-1, 1] -> latents."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"unknown input {kind!r}; choose from {', '.join(INPUT_KINDS)}")
    size = resolution // 8
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_images, latent_channels, size, size, generator=gen)
    if kind == "noise":
        return BenchInput(kind, None, noise)
    names: List[str] = [PHOTOS[i % len(PHOTOS)] for i in range(n_images)] if kind == "photo" else [kind] * n_images
    images = torch.stack([load_photo(name, resolution) for name in names])
    with torch.no_grad():
        x0 = encode(images).float()
    return BenchInput(kind, x0, noise)
