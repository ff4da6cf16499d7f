"""A fixed linear map between RGB images and SD latents, for models without trained VAE weights.

latent -> RGB: the widely used approximate SD 1.x latent-to-RGB factors (rows: the 4 latent
channels, columns: R, G, B), applied per latent pixel; RGB -> latent: their Moore-Penrose
pseudo-inverse applied to the 8x8 average of each image patch. The round trip RGB -> latent ->
RGB is exact on 8x8-averaged images. Images are in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
PATCH = 8


def _factors(dtype=torch.float32, device=None) -> torch.Tensor:
    return torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float64).to(device=device, dtype=dtype)


def rgb_to_latent(image: torch.Tensor) -> torch.Tensor:
    """image: (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> latent (B, 4, H/8, W/8)."""
    if image.shape[-1] % PATCH or image.shape[-2] % PATCH:
        raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of {PATCH}")
    pooled = F.avg_pool2d(image.float(), PATCH)
    inverse = torch.linalg.pinv(_factors(torch.float64)).float()  # (3, 4)
    return torch.einsum("bchw,cl->blhw", pooled, inverse.to(pooled.device))


def latent_to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """latent: (B, 4, h, w) -> RGB (B, 3, h, w), one pixel per latent, not clamped."""
    return torch.einsum("blhw,lc->bchw", latent.float(), _factors(device=latent.device))


def _projection(channels: int) -> torch.Tensor:
    """(channels, 3) fixed map RGB -> latent channels: orthonormal columns (QR of a Gaussian drawn
    with seed 0) times sqrt(channels / 3), so a latent channel varies about as much as an RGB one."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(channels, 3, generator=gen, dtype=torch.float64))
    return (q * (channels / 3) ** 0.5).float()


def rgb_to_channels(image: torch.Tensor, channels: int, patch: int = PATCH) -> torch.Tensor:
    """image (B, 3, H, W) in [-1, 1] -> latent (B, channels, H/patch, W/patch): the SD map for 4
    channels, else the fixed projection of the patch x patch-averaged pixels (diffusion
    transformers' 16/32/128-channel VAEs; patch = the VAE's spatial compression, LTX-Video 32)."""
    if channels == 4 and patch == PATCH:
        return rgb_to_latent(image)
    if image.shape[-1] % patch or image.shape[-2] % patch:
        raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of {patch}")
    pooled = F.avg_pool2d(image.float(), patch)
    return torch.einsum("bchw,lc->blhw", pooled, _projection(channels).to(pooled.device))


def channels_to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_channels (exact on 8x8-averaged images): (B, C, h, w) -> (B, 3, h, w)."""
    channels = latent.shape[1]
    if channels == 4:
        return latent_to_rgb(latent)
    inverse = torch.linalg.pinv(_projection(channels).double()).float().to(latent.device)  # (3, C)
    return torch.einsum("blhw,cl->bchw", latent.float(), inverse)
