"""Zero-shot video editing with a Stable Diffusion 1.x/2.x pipeline, per frame or with VidToMe.

Modes (after the VidToMe pipeline, Li et al., CVPR 2024):
- "invert": DDIM inversion of every frame with the source prompt (no CFG, unpatched UNet), then
  DDIM generation from the inverted latents with the edit prompt and CFG. Inverted latents are
  cached on disk under a key of the input and settings, so several edit prompts reuse one.
- "sdedit": partial strength: the frames' latents are noised to strength * steps and denoised
  with the edit prompt (no inversion).
Optional ControlNet conditioning on Canny edges of the input frames (OpenCV).

Every UNet call is one chunk of at most chunk_size frames (batch S*F, sample-major: uncond frames
then cond frames), so memory is bounded by the chunk, not by the video length. With VidToMe the
chunks have random borders and order per step (core.step_schedule) and the UNet's self-attention
merges tokens across the chunk's frames (diffusers.vidtome, which runs the core's schedule of each
step); per-frame editing uses the same
chunked calls with plain attention.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ..core import VidToMeOptions
from ..diffusers.vidtome import apply_vidtome, remove_vidtome, vidtome_state

MODES = ("invert", "sdedit")


@dataclass
class EditSettings:
    """Settings of one edit. vidtome: VidToMeOptions keyword arguments, or None for per-frame."""

    mode: str = "invert"
    steps: int = 8
    guidance: float = 7.5
    strength: float = 0.8
    seed: int = 0
    negative_prompt: str = "ugly, blurry, low res"
    chunk_size: int = 4
    vidtome: Optional[dict] = field(default_factory=dict)
    control: Optional[str] = None  # None or "canny"
    control_scale: float = 1.0
    canny: tuple = (100, 200)

    def check(self) -> "EditSettings":
        from ..core.options import OptionError, check_int

        if self.mode not in MODES:
            raise OptionError(f"mode={self.mode!r} is not allowed: use one of {MODES}")
        check_int("steps", self.steps, 1, 1000)
        check_int("seed", self.seed, 0, 2**63 - 1)  # torch.Generator.manual_seed overflows above
        if not isinstance(self.negative_prompt, str):  # None would silently turn CFG off
            raise OptionError(f"negative_prompt must be a string (\"\" for none), got {self.negative_prompt!r}")
        check_int("chunk_size", self.chunk_size, 1, 64)
        if not isinstance(self.guidance, (int, float)) or not 0 <= self.guidance <= 50:
            raise OptionError(f"guidance={self.guidance!r} is out of range: allowed [0, 50]")
        if self.mode == "sdedit" and (not isinstance(self.strength, (int, float)) or not 0 < self.strength <= 1):
            raise OptionError(f"strength={self.strength!r} is out of range: allowed (0, 1]")
        if self.control not in (None, "canny"):
            raise OptionError(f"control={self.control!r} is not allowed: use none or 'canny'")
        if self.vidtome is not None:
            VidToMeOptions.create(**{"seed": self.seed, "chunk_size": self.chunk_size, **self.vidtome})
        return self


def canny_images(frames: Sequence[np.ndarray], low: int = 100, high: int = 200) -> torch.Tensor:
    """Canny edges of RGB frames as ControlNet images (F, 3, H, W) in [0, 1]."""
    import cv2

    edges = [cv2.Canny(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), low, high) for f in frames]
    return torch.from_numpy(np.stack(edges)).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class VideoEditor:
    """Edits clips with one pipeline (unet, vae, text encoder, tokenizer, DDIM scheduler)."""

    def __init__(self, pipe, controlnet=None, cache_dir: Optional[str] = None, model_id: str = ""):
        from diffusers import DDIMScheduler

        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.controlnet = controlnet
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.model_id = model_id
        self.last_cache_hit = False
        self.last_merged_calls: dict = {}  # VidToMe: tokens per frame -> merged attention calls of the last generate

    # -- VAE, prompts -------------------------------------------------------------------------
    def encode(self, frames: Sequence[np.ndarray], chunk: int = 4) -> torch.Tensor:
        """RGB uint8 frames -> latents (F, 4, H/8, W/8) = posterior mean * scaling factor."""
        sf = self.vae.config.scaling_factor
        out = []
        for i in range(0, len(frames), chunk):
            x = torch.from_numpy(np.stack(frames[i : i + chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                out.append(self.vae.encode(x.to(self.device, self.vae.dtype)).latent_dist.mean * sf)
        return torch.cat(out).to(self.dtype)

    def decode(self, latents: torch.Tensor, chunk: int = 4) -> List[np.ndarray]:
        sf = self.vae.config.scaling_factor
        frames = []
        for i in range(0, latents.shape[0], chunk):
            with torch.no_grad():
                x = self.vae.decode((latents[i : i + chunk] / sf).to(self.vae.dtype)).sample
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            frames.extend(list(x))
        return frames

    def embed(self, prompt: str, negative: Optional[str] = None) -> torch.Tensor:
        """(S, 77, D): [negative, prompt] when negative is not None, else [prompt]."""
        with torch.no_grad():
            cond, uncond = self.pipe.encode_prompt(
                prompt, self.device, 1, negative is not None, negative_prompt=negative
            )
        return torch.cat([uncond, cond]) if negative is not None else cond

    # -- denoiser calls ----------------------------------------------------------------------
    def _eps(self, x, t, emb, frames, control, scale, guidance):
        """Noise prediction for the latents x (F, 4, h, w) of `frames` (one chunk, one call)."""
        S, F = emb.shape[0], x.shape[0]
        xin = x.repeat(S, 1, 1, 1)
        ehs = emb.repeat_interleave(F, dim=0)
        kwargs = {}
        if control is not None and self.controlnet is not None:
            cond = control[frames].to(self.device, self.controlnet.dtype).repeat(S, 1, 1, 1)
            down, mid = self.controlnet(
                xin, t, encoder_hidden_states=ehs, controlnet_cond=cond, conditioning_scale=scale, return_dict=False
            )
            kwargs = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        with torch.no_grad():
            out = self.unet(xin, t, encoder_hidden_states=ehs, **kwargs).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            a = self.scheduler.alphas_cumprod[int(t)].to(out)
            out = a.sqrt() * out + (1 - a).sqrt() * xin
        if S == 2:
            u, c = out.chunk(2)
            return u + guidance * (c - u)
        return out

    def _step_eps(self, x, t, emb, chunks, control=None, scale=1.0, guidance=1.0, vidtome=None, step=0):
        """Guided noise prediction of every frame, one denoiser call per chunk: the given chunks, or
        with VidToMe the chunks of the policy's schedule of this step."""
        eps = torch.empty_like(x)

        def call(frames):
            idx = torch.tensor(frames)
            eps[idx] = self._eps(x[idx], t, emb, idx, control, scale, guidance).to(x.dtype)

        if vidtome is not None:
            vidtome.run_step(x.shape[0], emb.shape[0], step, call)
        else:
            for frames in chunks:
                call(frames)
        return eps

    # -- inversion ---------------------------------------------------------------------------
    def invert(self, latents, prompt, steps, chunk=4, cache_key=None, progress: Optional[Callable] = None):
        """DDIM inversion (deterministic, no CFG, plain UNet) to the noise of the first step."""
        path = None
        self.last_cache_hit = False
        if self.cache_dir is not None and cache_key:
            path = self.cache_dir / f"{_key(key=cache_key, model=self.model_id, prompt=prompt, steps=steps, n=tuple(latents.shape))}.pt"
            if path.exists():
                try:
                    cached = torch.load(path, map_location=self.device)
                    if cached.shape == latents.shape:
                        self.last_cache_hit = True
                        return cached.to(self.dtype)
                except Exception:  # a corrupt cache entry is recomputed
                    pass
        sched = self.scheduler
        sched.set_timesteps(steps)
        emb = self.embed(prompt)
        acp = sched.alphas_cumprod
        stride = sched.config.num_train_timesteps // sched.num_inference_steps
        chunks = [list(range(i, min(i + chunk, latents.shape[0]))) for i in range(0, latents.shape[0], chunk)]
        x = latents.clone()
        for t in sched.timesteps.flip(0):
            prev = int(t) - stride
            a_prev = acp[prev] if prev >= 0 else sched.final_alpha_cumprod
            a_t = acp[int(t)]
            eps = self._step_eps(x, t, emb, chunks)
            x0 = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
            if progress:
                progress()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            torch.save(x.cpu(), tmp)
            os.replace(tmp, path)
        return x

    # -- generation --------------------------------------------------------------------------
    def generate(self, start, timesteps, prompt, s: EditSettings, control=None, progress=None, on_eps=None):
        """Denoise `start` (F, 4, h, w) over `timesteps` with CFG; VidToMe when s.vidtome is set.

        on_eps(step_index, eps): optional observer of every step's guided noise prediction (F, 4, h, w).
        """
        sched = self.scheduler
        emb = self.embed(prompt, s.negative_prompt if s.guidance != 1 else None)
        n = start.shape[0]
        st = None
        self.last_merged_calls = {}
        if s.vidtome is not None:
            opts = {"seed": s.seed, "chunk_size": s.chunk_size, **s.vidtome}
            apply_vidtome(self.unet, **opts)
            st = vidtome_state(self.unet)
        try:
            x = start
            chunks = [list(range(j, min(j + s.chunk_size, n))) for j in range(0, n, s.chunk_size)]
            for i, t in enumerate(timesteps):
                eps = self._step_eps(x, t, emb, chunks, control, s.control_scale, s.guidance, st, i)
                if on_eps is not None:
                    on_eps(i, eps)
                x = sched.step(eps, t, x).prev_sample
                if progress:
                    progress()
        finally:
            if st is not None:
                self.last_merged_calls = dict(st.merged_calls)
                remove_vidtome(self.unet)
        return x

    def edit(self, frames, source_prompt, edit_prompt, s: EditSettings, cache_key=None, progress=None, timings=None):
        """Edit RGB frames; returns the edited RGB frames. timings (dict) receives phase seconds."""
        import time

        s.check()
        timings = timings if timings is not None else {}
        t0 = time.perf_counter()
        latents = self.encode(frames, s.chunk_size)
        control = canny_images(frames, *s.canny) if s.control == "canny" else None
        sched = self.scheduler
        t1 = time.perf_counter()
        if s.mode == "invert":
            start = self.invert(latents, source_prompt, s.steps, s.chunk_size, cache_key, progress)
            sched.set_timesteps(s.steps)
            timesteps = sched.timesteps
        else:
            sched.set_timesteps(s.steps)
            init = min(max(int(round(s.steps * s.strength)), 1), s.steps)
            timesteps = sched.timesteps[s.steps - init :]
            gen = torch.Generator().manual_seed(s.seed)
            noise = torch.randn(latents.shape, generator=gen).to(latents)
            start = sched.add_noise(latents, noise, timesteps[:1])
        t2 = time.perf_counter()
        out = self.generate(start, timesteps, edit_prompt, s, control, progress)
        t3 = time.perf_counter()
        result = self.decode(out, s.chunk_size)
        t4 = time.perf_counter()
        timings.update(encode=t1 - t0, invert=t2 - t1, generate=t3 - t2, decode=t4 - t3, total=t4 - t0)
        return result
