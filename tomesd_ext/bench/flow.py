"""The noise schedule of rectified-flow models (Flux, SD3, Qwen-Image, Z-Image) for the bench.

Timestep t in [0, 1000] is sigma = t / 1000: x_t = (1 - sigma) x0 + sigma noise; the models
predict the velocity v = noise - x0, so x0 = x_t - sigma v. ``FlowSchedule`` is what the
one-forward unit of work (``--steps 0``) needs: ``add_noise``, ``init_noise_sigma`` and a config
that names the prediction type ("flow", read by denoise.predicted_x0).

``--steps N`` (denoise.denoise) samples with the Euler rule of rectified flow,
x <- x + (sigma_next - sigma) v, over the last N sigmas of an img2img-style schedule
(``flow_sigmas``): the full schedule has total = max(N, ceil(N x 1000 / --timestep)) steps,
sigma evenly spaced from 1 to 0 and then time-shifted, sigma' = s sigma / (1 + (s - 1) sigma),
by the family's shift s (``SHIFT``; the dynamic families take s = exp(mu), mu linear in the
image tokens between two anchors, as their schedulers do; shift_terminal and the like are
ignored); the run starts from the input noised at the first of those N sigmas.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

# Time shift per family: a number, or (tokens_a, mu_a, tokens_b, mu_b) for a resolution-dependent
# shift exp(mu), mu linear in the image tokens through the two anchors (extrapolated beyond them).
# Values of the releases' scheduler configs as far as we know them; Flux.2 takes Flux.1's rule
# (its pipeline computes mu by its own empirical fit; an approximation).
SHIFT = {
    "flux": (256, 0.5, 4096, 1.15), "flux2": (256, 0.5, 4096, 1.15), "qwen-image": (256, 0.5, 8192, 0.9),
    "ltx-video": (1024, 0.95, 4096, 2.05), "sd3": 3.0, "z-image": 3.0, "wan": 3.0, "hunyuan-video": 7.0,
}


class FlowSchedule:
    init_noise_sigma = 1.0
    config = SimpleNamespace(prediction_type="flow", num_train_timesteps=1000)

    @staticmethod
    def sigma(timestep) -> float:
        return float(timestep) / 1000

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma noise; x0, noise (n, C, h, w), timesteps (1,) or (n,)."""
        sigma = timesteps.to(torch.float32).reshape(-1, *[1] * (x0.dim() - 1)) / 1000
        return (1 - sigma) * x0 + sigma * noise


def image_tokens(subject, shape) -> int:
    """Tokens of the transformer's image sequence for latents of ``shape`` ((B, C, h, w) in 2x2
    patches, or video (B, C, F, h, w) in the model's patches)."""
    if len(shape) == 4:
        return (shape[-2] // 2) * (shape[-1] // 2)
    config = subject.denoiser.config
    patch = config.patch_size
    pt, ph, pw = tuple(patch) if isinstance(patch, (list, tuple)) else (getattr(config, "patch_size_t", 1) or 1, patch, patch)
    return (shape[2] // pt) * (shape[3] // ph) * (shape[4] // pw)


def time_shift(family: str, tokens: int) -> float:
    """The family's shift s (1.0 = none) at ``tokens`` image tokens (SHIFT)."""
    rule = SHIFT.get(family, 1.0)
    if not isinstance(rule, tuple):
        return float(rule)
    ta, ma, tb, mb = rule
    return math.exp(ma + (mb - ma) * (tokens - ta) / (tb - ta))


def flow_sigmas(subject, steps: int, timestep: int, shape) -> torch.Tensor:
    """The N + 1 sigmas (float64, decreasing, ending at 0) of an N-step run started at about
    strength timestep / 1000 (module docstring)."""
    total = max(steps, math.ceil(steps * 1000 / max(timestep, 1)))
    sigma = torch.linspace(1, 0, total + 1, dtype=torch.float64)
    s = time_shift(subject.family, image_tokens(subject, shape))
    return (s * sigma / (1 + (s - 1) * sigma))[-(steps + 1):]


def flow_start(inp, sigma: float) -> torch.Tensor:
    """Input ``inp`` (a BenchInput) at noise level sigma: (1 - sigma) x0 + sigma noise; pure noise
    stays pure noise, as the DDIM path starts it."""
    if inp.x0 is None:
        return inp.noise.clone()
    return (1 - sigma) * inp.x0 + sigma * inp.noise
