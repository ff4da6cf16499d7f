"""Zero-shot video editing with a video-transformer pipeline (Wan 2.1 / 2.2, LTX-Video): the
adapter around the core's flow editing (core.flow_edit: SDEdit and FlowEdit on the model's flow
schedule).

What runs where:
- here: the pipeline's parts. The clip is resized to the model's size multiple (VAE compression
  x transformer patch: Wan 16, LTX 32) and padded with copies of its last frame to a length the
  causal video VAE takes (Wan 4k + 1, LTX 8k + 1), encoded in one VAE call and normalised as the
  pipeline does; the prompts are encoded with the pipeline's own encode_prompt; every velocity is
  one transformer call of batch 2 (uncond, cond) with classifier-free guidance, or batch 1 at
  guidance 1 (models.video_call makes the call the pipeline makes). Wan 2.2's second expert
  (transformer_2) takes the steps below the pipeline's boundary. The result is decoded, the
  padding dropped and the frames resized back to the input's size.
- core.flow_edit: the sigma schedule (the scheduler config's shift, or LTX's resolution-dependent
  shift), SDEdit, FlowEdit.
- token merging: ``tome`` options go to apply_tome on the pipeline for the edit and are removed
  after it (the pipeline is reused by the next job), so the transformer keeps its contracts.
A clip longer than the model's native frame count is refused, naming the limit (no windows).
No inversion, so no inversion cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..core.flow_edit import check_flowedit, flow_sigmas, flowedit, resolution_mu, sdedit, sdedit_start
from ..core.options import OptionError, check_int

FLOW_MODES = ("sdedit", "flowedit")
# family -> the pipeline's default CFG scale, its prompt length, the longest clip it was trained on
FAMILIES = {
    "wan": {"guidance": 5.0, "text_tokens": 512, "max_frames": 81},
    "ltx-video": {"guidance": 3.0, "text_tokens": 128, "max_frames": 257},
}
WAN22_TI2V_FRAMES = 121  # Wan 2.2 TI2V-5B (expand_timesteps) generates 121 frames at 24 fps
TOME_KEYS = ("ratio", "dit_mode", "st", "frame_reach", "keep_first_frame", "min_tokens", "skip_ends", "seed")
DEFAULT_TOME = {"ratio": 0.5}  # apply_tome's video defaults; clips under min_tokens are not merged


@dataclass
class FlowEditSettings:
    """Settings of one edit with a flow-matching video model. tome: apply_tome keyword arguments
    (TOME_KEYS; its seed defaults to the job's, so a job merges alike on every run and worker),
    or None for no merging. guidance: the edit prompt's CFG scale (None: the
    family's default); source_guidance: the source prompt's (flowedit)."""

    mode: str = "sdedit"
    steps: int = 8
    guidance: Optional[float] = None
    source_guidance: float = 1.5
    strength: float = 0.8
    n_max: Optional[int] = None  # None: round(0.66 * steps)
    n_min: int = 0
    n_avg: int = 1
    seed: int = 0
    negative_prompt: str = ""
    tome: Optional[dict] = field(default_factory=lambda: dict(DEFAULT_TOME))

    def check(self) -> "FlowEditSettings":
        if self.mode not in FLOW_MODES:
            raise OptionError(f"mode={self.mode!r} is not allowed for a video-transformer model: use one of {FLOW_MODES}")
        check_int("steps", self.steps, 1, 1000)
        check_int("seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.negative_prompt, str):
            raise OptionError(f"negative_prompt must be a string (\"\" for none), got {self.negative_prompt!r}")
        for name in ("guidance", "source_guidance"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 50):
                raise OptionError(f"{name}={value!r} is out of range: allowed [0, 50]")
        if self.mode == "sdedit":
            sdedit_start(self.steps, self.strength)
        else:
            check_flowedit(self.steps, self.max_steps, self.n_min, self.n_avg)
        if self.tome is not None:
            if not isinstance(self.tome, dict):
                raise OptionError(f"tome must be false or a mapping of {', '.join(TOME_KEYS)}, got {self.tome!r}")
            unknown = sorted(set(self.tome) - set(TOME_KEYS))
            if unknown:
                raise OptionError(f"tome: unknown option(s) {unknown}; allowed: {', '.join(TOME_KEYS)}")
            from ..core.options import ToMeOptions

            ToMeOptions.create(**self.tome)
        return self

    @property
    def max_steps(self) -> int:
        """n_max, or its default round(0.66 * steps) (the paper's SD3 setting, 33 of 50)."""
        return self.n_max if self.n_max is not None else max(1, int(round(0.66 * self.steps)))


def family_of(pipe) -> str:
    """"wan" or "ltx-video" from the pipeline's transformer class."""
    model = pipe.transformer if pipe.transformer is not None else getattr(pipe, "transformer_2", None)
    name = type(model).__name__
    if name.startswith("WanTransformer3DModel"):
        return "wan"
    if name.startswith("LTXVideoTransformer3DModel"):
        return "ltx-video"
    raise ValueError(f"{type(pipe).__name__} holds a {name}; edit-video's flow methods take Wan or LTX-Video pipelines")


def _resize(frames: Sequence[np.ndarray], w: int, h: int) -> List[np.ndarray]:
    import cv2

    if frames[0].shape[:2] == (h, w):
        return list(frames)
    interp = cv2.INTER_AREA if w * h < frames[0].shape[0] * frames[0].shape[1] else cv2.INTER_CUBIC
    return [cv2.resize(f, (w, h), interpolation=interp) for f in frames]


class FlowVideoEditor:
    """Edits clips with one Wan / LTX-Video pipeline (transformer(s), VAE, text encoder, tokenizer)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.family = family_of(pipe)
        self.vae = pipe.vae
        model = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
        self.device, self.dtype = model.device, model.dtype
        self.text_tokens = getattr(pipe, "text_tokens", None) or FAMILIES[self.family]["text_tokens"]
        if self.family == "wan":
            c = self.vae.config  # Wan 2.1: 8x / 4x; Wan 2.2 TI2V-5B's VAE: 16x / 4x
            self.spatial = c.get("scale_factor_spatial") or 2 ** len(c.temperal_downsample) * (c.get("patch_size") or 1)
            self.temporal = c.get("scale_factor_temporal") or 2 ** sum(c.temperal_downsample)
            self.multiple = self.spatial * model.config.patch_size[1]
        else:
            self.spatial, self.temporal = self.vae.spatial_compression_ratio, self.vae.temporal_compression_ratio
            self.multiple = self.spatial * model.config.patch_size
        self.max_frames = FAMILIES[self.family]["max_frames"]
        if self.family == "wan" and getattr(pipe.config, "expand_timesteps", False):
            self.max_frames = WAN22_TI2V_FRAMES
        self.last_merged = False

    # -- geometry ------------------------------------------------------------------------------
    def model_size(self, w: int, h: int) -> tuple:
        """(W, H) the model runs at: each side rounded to the nearest multiple (at least one)."""
        m = self.multiple
        return max(m, int(round(w / m)) * m), max(m, int(round(h / m)) * m)

    def model_frames(self, n: int) -> int:
        """Frames the VAE takes for an n-frame clip: the next temporal * k + 1. Raises OptionError
        naming the model's limit when n exceeds it."""
        if n > self.max_frames:
            raise OptionError(f"the clip has {n} frames; this {self.family} model edits at most {self.max_frames} "
                              f"(its native length): select fewer with `frames: {{max: {self.max_frames}}}` or a stride")
        return -(-(n - 1) // self.temporal) * self.temporal + 1

    def tokens(self, latents: torch.Tensor) -> int:
        """Video tokens the transformer sees for latents (1, C, f, h, w): f x h/p x w/p."""
        f, h, w = latents.shape[2:]
        model = self.pipe.transformer if self.pipe.transformer is not None else self.pipe.transformer_2
        p = model.config.patch_size
        pt, ph, pw = (p[0], p[1], p[2]) if isinstance(p, (list, tuple)) else (getattr(model.config, "patch_size_t", 1) or 1, p, p)
        return (f // pt) * (h // ph) * (w // pw)

    # -- VAE, prompts --------------------------------------------------------------------------
    def _norm(self):
        c = self.vae.config
        if self.family == "wan":
            mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)
            std = torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
            return mean, std, 1.0
        return self.vae.latents_mean.view(1, -1, 1, 1, 1).cpu(), self.vae.latents_std.view(1, -1, 1, 1, 1).cpu(), c.scaling_factor

    def encode(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 frames (F = temporal * k + 1) -> normalised latents (1, C, f, h, w)."""
        x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1
        with torch.no_grad():
            z = self.vae.encode(x.to(self.device, self.vae.dtype)).latent_dist.mean.float().cpu()
        mean, std, scale = self._norm()
        return ((z - mean) * scale / std).to(self.device, self.dtype)

    def decode(self, latents: torch.Tensor) -> List[np.ndarray]:
        mean, std, scale = self._norm()
        z = latents.float().cpu() * std / scale + mean
        kwargs = {}
        if self.family == "ltx-video" and self.vae.config.timestep_conditioning:
            kwargs["temb"] = torch.zeros(1, device=self.device, dtype=self.vae.dtype)  # decode_timestep 0
        with torch.no_grad():
            x = self.vae.decode(z.to(self.device, self.vae.dtype), **kwargs).sample
        x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
        return list(x)

    def embed(self, prompt: str, negative: Optional[str]) -> tuple:
        """(text (S, L, D), mask (S, L)): [negative, prompt] when negative is not None, else [prompt]."""
        cfg = negative is not None
        with torch.no_grad():
            out = self.pipe.encode_prompt(prompt, negative_prompt=negative if cfg else None, do_classifier_free_guidance=cfg,
                                          max_sequence_length=self.text_tokens, device=self.device, dtype=self.dtype)
        if self.family == "wan":
            cond, uncond = out
            mask = torch.ones(cond.shape[:2], device=self.device)
            masks = (mask, mask)
        else:
            cond, cmask, uncond, umask = out
            masks = (cmask, umask)
        if cfg:
            return torch.cat([uncond, cond]), torch.cat([masks[1], masks[0]])
        return cond, masks[0]

    # -- velocity ------------------------------------------------------------------------------
    def _model(self, sigma: float):
        """The expert of this noise level: Wan 2.2 A14B's transformer_2 below the boundary."""
        boundary = getattr(self.pipe.config, "boundary_ratio", None)
        second = getattr(self.pipe, "transformer_2", None)
        if second is not None and (self.pipe.transformer is None or (boundary is not None and sigma < boundary)):
            return second
        return self.pipe.transformer

    def velocity(self, emb: tuple, guidance: float, fps: float):
        """v(x, sigma): the guided velocity with the prompt embedding `emb` (embed's output)."""
        from ..models.video_call import video_call

        text, mask = emb

        def v(x, sigma):
            s = text.shape[0]
            with torch.no_grad():
                out = video_call(self._model(sigma), self.family, x.repeat(s, 1, 1, 1, 1), sigma * 1000, text,
                                 mask=mask, frame_rate=fps)
            if s == 2:
                u, c = out.float().chunk(2)
                return u + guidance * (c - u)
            return out.float()

        return v

    def _sigmas(self, steps: int, latents: torch.Tensor) -> torch.Tensor:
        c = self.pipe.scheduler.config
        if c.get("use_dynamic_shifting"):
            tokens = latents.shape[2:].numel()  # LTX: patch 1, one token per latent pixel
            mu = resolution_mu(tokens, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])
            return flow_sigmas(steps, mu=mu)
        return flow_sigmas(steps, shift=float(c.get("flow_shift") or c.get("shift") or 1.0))

    # -- the edit ------------------------------------------------------------------------------
    def edit(self, frames, source_prompt, edit_prompt, s: FlowEditSettings, fps: float = 25.0, progress=None,
             timings=None) -> List[np.ndarray]:
        """Edit RGB frames (any size and length up to the native one); returns as many frames of
        the input's size. timings (dict) receives phase seconds."""
        import time

        from ..core.options import ToMeOptions
        from ..diffusers import apply_tome, remove_tome

        s.check()
        timings = timings if timings is not None else {}
        t0 = time.perf_counter()
        n, (h0, w0) = len(frames), frames[0].shape[:2]
        padded = list(frames) + [frames[-1]] * (self.model_frames(n) - n)
        w, h = self.model_size(w0, h0)
        latents = self.encode(_resize(padded, w, h))
        sigmas = self._sigmas(s.steps, latents)
        guidance = FAMILIES[self.family]["guidance"] if s.guidance is None else float(s.guidance)
        gen = torch.Generator().manual_seed(s.seed)

        def noise():
            return torch.randn(latents.shape, generator=gen).to(latents)

        t1 = time.perf_counter()
        tome = {"seed": s.seed, **s.tome} if s.tome is not None else None  # the merge pattern is the job's
        self.last_merged = tome is not None and self.tokens(latents) >= ToMeOptions.create(**tome).min_tokens
        if self.last_merged:  # under min_tokens apply_tome would skip every call: leave the model alone
            apply_tome(self.pipe, **tome)
        try:
            v_tar = self.velocity(self.embed(edit_prompt, s.negative_prompt if guidance != 1 else None), guidance, fps)
            if s.mode == "sdedit":
                out = sdedit(latents, sigmas, s.strength, noise(), v_tar, progress)
            else:
                sg = float(s.source_guidance)
                v_src = self.velocity(self.embed(source_prompt, s.negative_prompt if sg != 1 else None), sg, fps)
                out = flowedit(latents, sigmas, v_src, v_tar, noise, s.max_steps, s.n_min, s.n_avg, progress)
        finally:
            if self.last_merged:
                remove_tome(self.pipe)
        t2 = time.perf_counter()
        result = _resize(self.decode(out.to(self.dtype))[:n], w0, h0)
        t3 = time.perf_counter()
        timings.update(encode=t1 - t0, generate=t2 - t1, decode=t3 - t2, total=t3 - t0)
        return result

    def steps_of(self, s: FlowEditSettings) -> int:
        """Progress units of an edit (one per step run)."""
        if s.mode == "sdedit":
            return s.steps - sdedit_start(s.steps, s.strength)
        return s.max_steps
