"""A synthetic moving-shapes clip: a textured background with a disc and a square moving smoothly."""

from __future__ import annotations

from typing import List

import numpy as np


def moving_shapes(n_frames: int = 8, size: int = 256, seed: int = 0) -> List[np.ndarray]:
    """n_frames RGB uint8 frames (size, size, 3): a gradient background with soft texture, a red
    disc moving right and a blue square moving down-left, 3 px per frame at 256 px."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    texture = rng.normal(0, 1, (size // 16 + 1, size // 16 + 1)).astype(np.float32)
    texture = np.kron(texture, np.ones((16, 16), np.float32))[:size, :size]
    base = np.stack([0.35 + 0.3 * xx, 0.45 + 0.2 * yy, 0.6 - 0.2 * xx], -1) + 0.04 * texture[..., None]
    step = 3.0 * size / 256
    frames = []
    for t in range(n_frames):
        img = base.copy()
        cx, cy, r = 0.25 * size + step * t, 0.4 * size, 0.12 * size
        disc = (xx * size - cx) ** 2 + (yy * size - cy) ** 2 <= r**2
        img[disc] = (0.85, 0.2, 0.15)
        sx, sy, half = 0.7 * size - step * t, 0.3 * size + step * t, 0.09 * size
        square = (abs(xx * size - sx) <= half) & (abs(yy * size - sy) <= half)
        img[square] = (0.15, 0.3, 0.85)
        frames.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return frames
