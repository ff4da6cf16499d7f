"""One measured unit of work: a single denoiser forward (--steps 0) or a sampling run of N steps
(--steps N): DDIM for UNets and DDPM-trained transformers (PixArt), the flow-matching Euler
sampler of flow.py for rectified-flow transformers (images and video); classifier-free guidance
when the batch is even (uncond + cond halves), none when it is odd."""

from __future__ import annotations

import copy
import math
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

GUIDANCE = 7.5  # UNets (SD1.x/2.x/XL pipelines' default)
# Transformers with CFG (an even --batch): their pipelines' default scale (diffusers 0.42); the
# guidance-distilled ones (Flux.1/2-dev, HunyuanVideo) have none of their own: GUIDANCE.
DIT_GUIDANCE = {"sd3": 7.0, "pixart": 4.5, "qwen-image": 4.0, "z-image": 5.0, "wan": 5.0, "ltx-video": 3.0}


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


def guidance_scale(subject) -> float:
    return DIT_GUIDANCE.get(subject.family, GUIDANCE) if subject.is_dit else GUIDANCE


def denoise(subject, inp, cond: dict, cfg: bool, steps: int, timestep: int) -> Output:
    """Run the unit of work on BenchInput `inp` (n images): --steps 0 denoises it noised at
    `timestep`; --steps N samples from it noised at the first of N steps below `timestep`."""
    device, dtype = subject.device, subject.dtype
    model = subject.denoiser

    def forward(latents, t):
        x_in = torch.cat([latents, latents]) if cfg else latents
        # a diffusers cache (fbcache) keeps its state per named context, as the pipelines set it
        cache = model.cache_context("cond") if getattr(model, "is_cache_enabled", False) else contextlib.nullcontext()
        with torch.no_grad(), cache:
            out = subject.forward(x_in.to(device, dtype), t, cond)
        return out.float().cpu()

    def guided(out):
        if not cfg:
            return out
        uncond, c = out.chunk(2)
        return uncond + guidance_scale(subject) * (c - uncond)

    if steps == 0:
        x_t = inp.noised(subject.scheduler, timestep)
        t = timestep if subject.is_dit else torch.tensor(timestep, device=device)  # transformers take a number
        out = forward(x_t, t)
        cond_half = out[out.shape[0] // 2 :] if cfg else out
        return Output(out, None, predicted_x0(subject.scheduler, x_t, cond_half, timestep))
    if subject.scheduler.config.prediction_type == "flow":
        from .flow import flow_sigmas, flow_start

        sigmas = flow_sigmas(subject, steps, timestep, inp.noise.shape)
        latents = flow_start(inp, float(sigmas[0]))
        first = None
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            out = forward(latents, float(sigma) * 1000)  # dit_call: the scheduler timestep, sigma x 1000
            first = out if first is None else first
            latents = latents + float(sigma_next - sigma) * guided(out)
        return Output(first, latents, latents)
    sched, timesteps = sampling_timesteps(subject.scheduler, steps, timestep)
    latents = inp.noised(sched, timesteps[0])
    first = None
    for t in timesteps:
        x_in = sched.scale_model_input(latents, t)
        out = forward(x_in, t.to(device))
        if first is None:
            first = out
        latents = sched.step(guided(out), t, latents).prev_sample
    return Output(first, latents, latents)
