"""Editing with rectified-flow models: the sigma schedule, SDEdit and FlowEdit, as pure tensor
functions of a velocity field (no diffusers import; the video adapter supplies the model call).

Convention (Wan, LTX-Video, SD3, Flux): x_sigma = (1 - sigma) x0 + sigma * noise, sigma in
[0, 1], the model predicts the velocity v = noise - x0, and a step from sigma_i to sigma_j is the
Euler step x + (sigma_j - sigma_i) v. ``velocity(x, sigma)`` returns the (guided) velocity at x.

- ``flow_sigmas``: `steps` + 1 decreasing sigmas from 1 to 0, shifted as the model's scheduler
  shifts them (a fixed shift s: s*u / (1 + (s - 1) u); LTX's resolution-dependent shift:
  exp(mu) / (exp(mu) + 1/u - 1) with mu interpolated from the token count).
- ``sdedit``: noise x0 to the sigma of step round((1 - strength) * steps) with the given noise
  and integrate the edit prompt's velocity to 0 (Meng et al., SDEdit, on the flow schedule).
- ``flowedit``: FlowEdit (Kulikov, Kleiner, Huberman-Spiegelglas & Michaeli, "FlowEdit:
  Inversion-Free Text-Based Editing Using Pre-Trained Flow Models", arXiv 2412.08629), Alg. 1:
  the edited latent Z starts at the source x_src; at each of the last n_max steps (sigma_i ->
  sigma_{i-1}) n_avg noises N give Z_src = (1 - sigma_i) x_src + sigma_i N and
  Z_tar = Z + Z_src - x_src, and Z moves by (sigma_{i-1} - sigma_i) * mean(V_tar(Z_tar) - V_src(Z_src)).
  The last n_min steps are plain sampling from Z noised with one fresh noise (the paper's n_min).
  No inversion: nothing to cache.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .options import OptionError, check_int

Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def shift_sigmas(u: torch.Tensor, shift: float = 1.0, mu: Optional[float] = None) -> torch.Tensor:
    """Shift unit-interval sigmas u: a fixed shift (shift * u / (1 + (shift - 1) u)) or, with mu,
    the exponential time shift exp(mu) / (exp(mu) + 1/u - 1) (u = 0 stays 0)."""
    if mu is not None:
        e = math.exp(mu)
        safe = u.clamp_min(1e-12)
        return torch.where(u > 0, e / (e + 1 / safe - 1), torch.zeros_like(u))
    return shift * u / (1 + (shift - 1) * u)


def resolution_mu(tokens: int, base_tokens: int, max_tokens: int, base_shift: float, max_shift: float) -> float:
    """mu of a resolution-dependent shift: linear in the token count, base_shift at base_tokens,
    max_shift at max_tokens (extrapolated beyond)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (tokens - base_tokens)


def flow_sigmas(steps: int, shift: float = 1.0, mu: Optional[float] = None) -> torch.Tensor:
    """`steps` + 1 sigmas (float64) from 1 down to 0: linear in [1, 1/steps] then shifted, and a final 0."""
    check_int("steps", steps, 1, 10000)
    u = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return torch.cat([shift_sigmas(u, shift, mu), torch.zeros(1, dtype=torch.float64)])


def _euler(x: torch.Tensor, sigmas: torch.Tensor, velocity: Velocity, progress=None) -> torch.Tensor:
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (s_next - s) * velocity(x, s).to(x.dtype)
        if progress:
            progress()
    return x


def sdedit_start(steps: int, strength: float) -> int:
    """Index of the first step SDEdit runs: strength 1 starts from pure noise (index 0)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise OptionError(f"strength={strength!r} is out of range: allowed (0, 1]")
    return steps - min(max(int(round(steps * strength)), 1), steps)


def sdedit(x0: torch.Tensor, sigmas: torch.Tensor, strength: float, noise: torch.Tensor, velocity: Velocity,
           progress=None) -> torch.Tensor:
    """SDEdit on a flow schedule: x0 noised to sigmas[start] with `noise`, then Euler steps of
    `velocity` to sigma 0 (round(strength * steps) steps, at least one)."""
    start = sdedit_start(len(sigmas) - 1, strength)
    s = float(sigmas[start])
    x = (1 - s) * x0 + s * noise.to(x0)
    return _euler(x, sigmas[start:], velocity, progress)


def check_flowedit(steps: int, n_max: int, n_min: int, n_avg: int) -> None:
    """OptionError naming the value when n_max, n_min, n_avg do not fit `steps`."""
    check_int("n_max", n_max, 1, steps)
    check_int("n_min", n_min, 0, n_max - 1)
    check_int("n_avg", n_avg, 1, 64)


def flowedit(x_src: torch.Tensor, sigmas: torch.Tensor, v_src: Velocity, v_tar: Velocity,
             noise: Callable[[], torch.Tensor], n_max: int, n_min: int = 0, n_avg: int = 1,
             progress=None) -> torch.Tensor:
    """FlowEdit (module docstring) of the clean source latents x_src over `sigmas` (steps + 1,
    decreasing to 0). v_src / v_tar: the velocity with the source / target prompt (each with its
    own guidance); noise(): a fresh N(0, 1) draw shaped like x_src (seeded by the caller).
    Steps before the last n_max are skipped (the edit starts at sigmas[steps - n_max]); the last
    n_min are plain sampling with v_tar. Returns the edited clean latents."""
    steps = len(sigmas) - 1
    check_flowedit(steps, n_max, n_min, n_avg)
    z = x_src.clone()
    first, plain = steps - n_max, steps - n_min
    sig = sigmas.tolist()
    for i in range(first, plain):
        s, s_next = sig[i], sig[i + 1]
        delta = torch.zeros_like(x_src)
        for _ in range(n_avg):
            z_src = (1 - s) * x_src + s * noise().to(x_src)
            z_tar = z + z_src - x_src
            delta += (v_tar(z_tar, s).to(x_src.dtype) - v_src(z_src, s).to(x_src.dtype)) / n_avg
        z = z + (s_next - s) * delta
        if progress:
            progress()
    if n_min == 0:
        return z
    s = sig[plain]
    z_tar = z + ((1 - s) * x_src + s * noise().to(x_src)) - x_src
    return _euler(z_tar, sigmas[plain:], v_tar, progress)
