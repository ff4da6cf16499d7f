"""The noise schedule of rectified-flow models (Flux, SD3, Qwen-Image, Z-Image) for the bench.

Timestep t in [0, 1000] is sigma = t / 1000: x_t = (1 - sigma) x0 + sigma noise; the models
predict the velocity v = noise - x0, so x0 = x_t - sigma v. Only what the bench's one-forward
unit of work (``--steps 0``) needs: ``add_noise``, ``init_noise_sigma`` and a config that names
the prediction type ("flow", read by denoise.predicted_x0).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


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
