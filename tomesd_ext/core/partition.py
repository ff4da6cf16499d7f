"""Destination/source partition of a token grid (ToMe-SD, Bolya & Hoffman 2023, sec. 3.3).

One destination per sx x sy window, drawn at random inside the window (or the top-left token);
tokens of the bottom rows / right columns that do not fill a window are always sources.
Randomness comes only from a CPU `torch.Generator` seeded by a hash of explicit keys, so the
same keys give the same partition on every call and on every device.
"""

from __future__ import annotations

import hashlib
from typing import Tuple

import torch


def derive_seed(*keys) -> int:
    """A 63-bit seed from arbitrary hashable keys (stable across processes)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def timestep_key(t) -> float:
    """A hashable key of a denoiser's timestep (a number or a tensor whose first entry is used).

    Both adapters key the random partition on it: diffusers on the UNet's `timestep` argument,
    ComfyUI on `model_sampling.timestep(sigma)`. Rounded so float noise cannot split one step.
    """
    if hasattr(t, "flatten"):
        t = float(t.flatten()[0].item()) if t.numel() else 0.0
    return round(float(t), 6) if t is not None else 0.0


def window_partition(
    h: int, w: int, sx: int, sy: int, seed: int | None, device=None, frames: int = 1, st: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split the frames*h*w raster indices (frame-major, then row-major) into (dst_idx, src_idx),
    both sorted ascending.

    dst_idx: one per st x sy x sx window, (ceil(frames/st) * floor(h/sy) * floor(w/sx),): when st
    does not divide frames, the last frames form one shallower window of their own (a video's odd
    trailing latent frame gets destinations too); src_idx: (N - N_dst,). Tokens of the bottom rows /
    right columns that do not fill a window are sources. Images are frames = st = 1. seed None ->
    the first token of every window (tomesd's use_rand=False). The full windows' draws do not
    depend on the trailing window, so an image partition is the same with or without frames/st.
    """
    full, rest = divmod(frames, st)
    hsy, wsx = h // sy, w // sx
    n = frames * h * w
    if frames == 0 or hsy == 0 or wsx == 0:
        return torch.empty(0, dtype=torch.long, device=device), torch.arange(n, device=device)
    plane_size = sx * sy
    gen = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)

    def offsets(windows: int, depth: int) -> torch.Tensor:  # (windows, hsy, wsx) in [0, depth*sx*sy)
        if gen is None:
            return torch.zeros(windows, hsy, wsx, dtype=torch.long)
        return torch.randint(depth * plane_size, (windows, hsy, wsx), generator=gen)

    off = offsets(full, st)
    first = torch.arange(full) * st
    if rest:
        off = torch.cat([off, offsets(1, rest)])
        first = torch.cat([first, torch.tensor([full * st])])
    plane = off % plane_size
    frame = first.view(-1, 1, 1) + off // plane_size
    rows = torch.arange(hsy).view(1, -1, 1) * sy + plane // sx
    cols = torch.arange(wsx).view(1, 1, -1) * sx + plane % sx
    dst = ((frame * h + rows) * w + cols).flatten()
    # the sources: every index that is no destination, ascending; by a stable sort of the
    # destination flags (their count is known), with no data-dependent shape (nonzero)
    is_dst = torch.zeros(n, dtype=torch.uint8)
    is_dst[dst] = 1
    src = torch.sort(is_dst, stable=True).indices[: n - dst.numel()]
    dst = dst.sort().values
    return dst.to(device), src.to(device)
