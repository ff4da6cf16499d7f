"""Fidelity of a merged model against the unmerged one on the same input and seed."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..core.schedule import relative_error


# Relative L2 error ||output - reference|| / ||reference|| (float64; 0 when both are 0): the
# measure of the error budget (core/schedule.py), so bench figures and max_error agree.
rel_error = relative_error


def frame_change(video: torch.Tensor) -> float:
    """Mean |x[:, :, t + 1] - x[:, :, t]| over consecutive latent frames of video (B, C, F, h, w)
    (float64); the bench's temporal figure divides a method's by the unmerged run's."""
    x = video.double()
    if x.ndim != 5 or x.shape[2] < 2:
        raise ValueError(f"frame_change needs (B, C, F, h, w) with F >= 2, got shape {tuple(x.shape)}")
    return (x[:, :, 1:] - x[:, :, :-1]).abs().mean().item()


def psnr(image: np.ndarray, reference: np.ndarray) -> Optional[float]:
    """PSNR in dB of (H, W, 3) images in [0, 1]; None when they are identical (infinite PSNR)."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(image, reference):
        return None
    return float(peak_signal_noise_ratio(reference, image, data_range=1.0))


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """SSIM of (H, W, 3) images in [0, 1] (7x7 window, smaller for images under 7 px)."""
    from skimage.metrics import structural_similarity

    side = min(image.shape[0], image.shape[1])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        raise ValueError(f"image {image.shape[:2]} is too small for SSIM (needs >= 3 px)")
    return float(structural_similarity(reference, image, channel_axis=-1, data_range=1.0, win_size=win))


def to_image(rgb: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) float64 numpy in [0, 1] (clamped)."""
    return ((rgb.detach().double().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
