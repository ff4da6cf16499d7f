"""Token-grid geometry: which level a block runs at, and its (h, w) grid.

A UNet level with downsample factor d sees a grid of ceil(H/d) x ceil(W/d) tokens for a
latent of H x W (stride-2 convolutions with padding 1 round up), flattened row-major.
"""

from __future__ import annotations

from typing import Optional, Tuple


def level_grid(n_tokens: int, latent_hw: Tuple[int, int], max_factor: int = 64) -> Optional[Tuple[int, int, int]]:
    """Return (d, h, w) such that h*w == n_tokens for h = ceil(H/d), w = ceil(W/d), d a power of 2.

    Returns None when no level matches (e.g. a temporal block whose sequence is frames), in which
    case the caller must not merge.
    """
    for d, h, w in level_sizes(latent_hw, max_factor):
        if h * w == n_tokens:
            return d, h, w
        if h * w < n_tokens:
            return None
    return None


def level_sizes(latent_hw: Tuple[int, int], max_factor: int):
    """[(d, h, w)] of every level d = 1, 2, 4, ... <= max_factor of an H x W latent."""
    H, W = latent_hw
    sizes, d = [], 1
    while d <= max_factor:
        sizes.append((d, -(-H // d), -(-W // d)))
        d *= 2
    return sizes


def tokens_to_remove(ratio: float, n_tokens: int, n_src: int) -> int:
    """r = floor(ratio * N), capped at the number of sources."""
    return max(0, min(int(ratio * n_tokens), n_src))
