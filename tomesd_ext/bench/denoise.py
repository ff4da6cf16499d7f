"""One measured unit of work: a single denoiser forward (--steps 0) or N DDIM steps with CFG
(UNets; diffusion transformers: --steps 0 only)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch

GUIDANCE = 7.5


@dataclass
class Output:
    """noise_pred: the first denoiser output (B, C, h, w); final: the latents after N steps (None
    for --steps 0); image_latent: what is decoded for PSNR/SSIM (predicted x0 of the conditional
    half for --steps 0, the final latents otherwise). All float32 on the CPU."""

    noise_pred: torch.Tensor
    final: Optional[torch.Tensor]
    image_latent: torch.Tensor


def predicted_x0(scheduler, x_t: torch.Tensor, model_out: torch.Tensor, t: int) -> torch.Tensor:
    """x0 from the model output at timestep t (epsilon, v_prediction, sample prediction, or the
    velocity of a rectified-flow model: x0 = x_t - sigma v, sigma = t / 1000)."""
    x_t, out = x_t.double(), model_out.double()
    kind = scheduler.config.prediction_type
    if kind == "flow":
        return (x_t - float(t) / 1000 * out).float()
    a = scheduler.alphas_cumprod[int(t)].double()
    if kind == "epsilon":
        x0 = (x_t - (1 - a).sqrt() * out) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
    else:
        x0 = out
    return x0.float()


def sampling_timesteps(scheduler, steps: int, t_start: int):
    """A fresh copy of the scheduler and the last `steps` of its schedule, all <= about t_start
    (img2img-style strength t_start / 1000)."""
    sched = copy.deepcopy(scheduler)
    total = max(steps, math.ceil(steps * scheduler.config.num_train_timesteps / max(t_start, 1)))
    sched.set_timesteps(total)
    return sched, sched.timesteps[-steps:]


def denoise(subject, inp, cond: dict, cfg: bool, steps: int, timestep: int) -> Output:
    """Run the unit of work on BenchInput `inp` (n images): --steps 0 denoises it noised at
    `timestep`; --steps N samples from it noised at the first of N steps below `timestep`."""
    device, dtype = subject.device, subject.dtype

    def forward(latents, t):
        x_in = torch.cat([latents, latents]) if cfg else latents
        with torch.no_grad():
            out = subject.forward(x_in.to(device, dtype), t, cond)
        return out.float().cpu()

    if steps == 0:
        x_t = inp.noised(subject.scheduler, timestep)
        t = timestep if subject.is_dit else torch.tensor(timestep, device=device)  # transformers take a number
        out = forward(x_t, t)
        cond_half = out[out.shape[0] // 2 :] if cfg else out
        return Output(out, None, predicted_x0(subject.scheduler, x_t, cond_half, timestep))
    if subject.is_dit:
        raise ValueError("diffusion transformers: only --steps 0 (one denoiser forward) is measured")
    sched, timesteps = sampling_timesteps(subject.scheduler, steps, timestep)
    latents = inp.noised(sched, timesteps[0])
    first = None
    for t in timesteps:
        x_in = sched.scale_model_input(latents, t)
        out = forward(x_in, t.to(device))
        if first is None:
            first = out
        if cfg:
            uncond, c = out.chunk(2)
            out = uncond + GUIDANCE * (c - uncond)
        latents = sched.step(out, t, latents).prev_sample
    return Output(first, latents, latents)
