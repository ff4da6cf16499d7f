"""The model under test: a built-in architecture with seeded random weights (a UNet or a
diffusion transformer), or a local checkpoint (diffusers folder or single-file .safetensors)
with real weights (UNet pipelines).

Built-in models get the sharpened-attention fidelity variant by default
(models.sharpen_self_attention, docs/bench.md "Sharpened attention"): with plain random weights
self-attention is nearly uniform and merging errors cannot rank methods. Speed is measured on
the same model (it does not depend on the weights). Real weights are never sharpened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .latent_map import channels_to_rgb, latent_to_rgb, rgb_to_channels, rgb_to_latent

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a photograph of an astronaut riding a horse"


def model_kind(spec: str) -> str:
    """"builtin", "folder" or "file" for a --model value; ValueError with the choices otherwise."""
    from ..models import MODEL_NAMES

    if spec in MODEL_NAMES:
        return "builtin"
    looks_like_path = os.sep in spec or spec.endswith((".safetensors", ".ckpt")) or os.path.exists(spec)
    if not looks_like_path:
        raise ValueError(f"unknown model {spec!r}; choose one of {', '.join(MODEL_NAMES)} or a local path")
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "model_index.json")) and not os.path.exists(
            os.path.join(spec, "unet", "config.json")
        ):
            raise ValueError(f"--model {spec!r} is a folder without model_index.json: not a diffusers pipeline folder")
        return "folder"
    if os.path.isfile(spec):
        if not spec.endswith(".safetensors"):
            raise ValueError(f"--model {spec!r}: only single-file .safetensors checkpoints are supported")
        return "file"
    raise ValueError(f"--model {spec!r}: no such file or folder")


@dataclass
class Subject:
    """denoiser (a UNet or a diffusion transformer, on device, dtype), its scheduler (DDIM, or
    FlowSchedule for rectified-flow transformers), and for real weights the pipeline (VAE, text
    encoders). family: "unet" or the transformer family (models.model_family); text_tokens: the
    text sequence of one transformer forward. Video transformers and AnimateDiff UNets (family
    "unet" with ``video`` set) work on (B, C, F, h, w) latents of ``frames``-frame clips
    (bench_input, decode; an AnimateDiff UNet takes one text row per frame)."""

    name: str
    denoiser: torch.nn.Module
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    pipe: Optional[object] = None  # real weights only
    sharpened: bool = False
    family: str = "unet"
    text_tokens: int = 77
    video: Optional[dict] = None  # video transformers: VAE geometry and default clip (models.video_configs)
    frames: Optional[int] = None  # video transformers: pixel frames of a clip

    @property
    def real_weights(self) -> bool:
        return self.pipe is not None

    @property
    def is_dit(self) -> bool:
        return self.family != "unet"

    @property
    def latent_channels(self) -> int:
        from ..models import LATENT_CHANNELS

        return LATENT_CHANNELS[self.family] if self.is_dit else 4

    @property
    def is_video(self) -> bool:
        return self.video is not None

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.denoiser.config, "addition_embed_type", None) == "text_time"

    def forward(self, latents: torch.Tensor, timestep, cond: dict) -> torch.Tensor:
        """One denoiser call on latents (B, C, h, w) at scheduler timestep; returns (B, C, h, w)
        (noise prediction of a UNet; velocity or epsilon of a transformer, models.dit_call)."""
        if not self.is_dit:
            return self.denoiser(latents, timestep, **cond).sample
        from ..models import dit_call

        return dit_call(self.denoiser, self.family, latents, timestep, cond["text"], cond["pooled"])

    def bench_input(self, kind: str, n_images: int, resolution, seed: int):
        """BenchInput ``kind`` for n_images images (inputs.make_input) or, for a video transformer,
        n_images clips of ``frames`` frames at resolution (height, width) (video_inputs)."""
        if self.is_video:
            from .video_inputs import make_video_input

            height, width = resolution
            return make_video_input(kind, n_images, height, width, self.frames, self.video, seed)
        from .inputs import make_input

        return make_input(kind, n_images, resolution, seed, self.encode, self.latent_channels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> latents (n, C, H/8, W/8), float32 on the CPU."""
        if self.is_dit:
            return rgb_to_channels(images, self.latent_channels)
        if not self.real_weights:
            return rgb_to_latent(images)
        vae = self.pipe.vae
        with torch.no_grad():
            dist = vae.encode(images.to(self.device, vae.dtype)).latent_dist
        return (dist.mean * vae.config.scaling_factor).float().cpu()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (n, C, h, w) -> RGB (n, 3, H, W) in about [-1, 1] (VAE, or the linear map at h x w);
        video latents (n, C, F, h, w) -> every latent frame, (n * F, 3, h, w)."""
        if self.is_video:
            return channels_to_rgb(latents.float().cpu().transpose(1, 2).flatten(0, 1))
        if self.is_dit:
            return channels_to_rgb(latents.float().cpu())
        if not self.real_weights:
            return latent_to_rgb(latents.float().cpu())
        vae = self.pipe.vae
        with torch.no_grad():
            image = vae.decode(latents.to(self.device, vae.dtype) / vae.config.scaling_factor).sample
        return image.float().cpu()

    def conditioning(self, n_images: int, cfg: bool, resolution: int, seed: int) -> dict:
        """UNet keyword arguments for a batch of n_images (doubled as [uncond, cond] with CFG).

        Real weights: the pipeline's own prompt encoding of PROMPT and the empty negative prompt.
        Random weights: seeded N(0, 1) text embeddings (and SDXL's pooled embeds and time ids);
        transformers: {"text": (B, L, D), "pooled": (B, P) or None} (models.text_conditioning).
        """
        halves = 2 if cfg else 1
        if self.is_dit:
            from ..models import text_conditioning

            cond = text_conditioning(self.family, self.denoiser.config, halves * n_images, self.text_tokens, seed, halves)
            return {k: None if v is None else v.to(self.device, self.dtype) for k, v in cond.items()}
        cfg_dim = self.denoiser.config.cross_attention_dim
        if self.real_weights and hasattr(self.pipe, "encode_prompt"):
            with torch.no_grad():
                enc = self.pipe.encode_prompt(
                    prompt=PROMPT, device=self.device, num_images_per_prompt=n_images,
                    do_classifier_free_guidance=cfg, negative_prompt="",
                )
            if self.is_sdxl:
                cond, uncond, pooled, neg_pooled = enc
                text = torch.cat([neg_pooled, pooled]) if cfg else pooled
            else:
                cond, uncond = enc
                text = None
            hidden = torch.cat([uncond, cond]) if cfg else cond
        else:
            gen = torch.Generator().manual_seed(seed + 7)
            hidden = torch.randn(halves, 1, 77, cfg_dim, generator=gen).repeat_interleave(n_images, 0).flatten(0, 1)
            text = None
            if self.is_sdxl:
                width = self.denoiser.config.projection_class_embeddings_input_dim - 6 * self.denoiser.config.addition_time_embed_dim
                text = torch.randn(halves, 1, width, generator=gen).repeat_interleave(n_images, 0).flatten(0, 1)
        if self.is_video:  # AnimateDiff: one text row per frame, clip b's at b*F .. b*F + F - 1
            hidden = hidden.repeat_interleave(self.frames, 0)
        kwargs = {"encoder_hidden_states": hidden.to(self.device, self.dtype)}
        if self.is_sdxl:
            h, w = resolution if isinstance(resolution, tuple) else (resolution, resolution)  # AnimateDiff: (h, w)
            ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": text.to(self.device, self.dtype),
                "time_ids": ids.repeat(halves * n_images, 1).to(self.device, self.dtype),
            }
        return kwargs


def _ddim(config):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config)


def load_subject(spec: str, device="cpu", dtype="fp32", seed: int = 0, sharpen: bool = True,
                 frames: Optional[int] = None) -> Subject:
    """Build or load the model named by --model (see model_kind); frames: clip length of a video
    transformer (None: its default clip's)."""
    device = torch.device(device)
    torch_dtype = DTYPES[dtype]
    kind = model_kind(spec)
    if kind == "builtin":
        from ..models import build_scheduler, build_unet, model_family, sharpen_self_attention

        if model_family(spec) == "animatediff":
            return _load_motion_unet(spec, device, torch_dtype, seed, sharpen, frames)
        if model_family(spec) != "unet":
            return _load_transformer(spec, device, torch_dtype, seed, sharpen, frames)

        unet = build_unet(spec, seed=seed, dtype=torch.float32)
        if sharpen:
            sharpen_self_attention(unet)
        unet = torch.nn.Module.to(unet, device=device, dtype=torch_dtype)  # no diffusers fp32-module warning
        return Subject(spec, unet, _ddim(build_scheduler(spec).config), device, torch_dtype, sharpened=sharpen)
    pipe = _load_pipeline(spec, kind, torch_dtype)
    pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return Subject(spec, pipe.unet.eval(), _ddim(pipe.scheduler.config), device, torch_dtype, pipe=pipe)


def _load_motion_unet(spec: str, device, torch_dtype, seed: int, sharpen: bool, frames: Optional[int] = None) -> Subject:
    """A built-in AnimateDiff UNet (models.build_motion_unet; spatial self-attention sharpened
    unless told not): a UNet subject on clips of ``frames`` frames (default 16)."""
    from ..models import MOTION_CONFIGS, build_motion_unet, build_scheduler
    from ..models.motion import MOTION_VIDEO

    unet = build_motion_unet(spec, seed=seed, sharpen=sharpen)
    unet = torch.nn.Module.to(unet, device=device, dtype=torch_dtype)
    scheduler = _ddim(build_scheduler(MOTION_CONFIGS[spec][0]).config)
    return Subject(spec, unet, scheduler, device, torch_dtype, sharpened=sharpen, video=MOTION_VIDEO,
                   frames=frames or MOTION_VIDEO["frames"])


def _load_transformer(spec: str, device, torch_dtype, seed: int, sharpen: bool, frames: Optional[int] = None) -> Subject:
    """A built-in diffusion transformer (models.build_transformer), sharpened unless told not."""
    from ..models import build_transformer, get_dit_config, sharpen_self_attention

    from .flow import FlowSchedule

    entry = get_dit_config(spec)
    model = build_transformer(spec, seed=seed, dtype=torch.float32)
    if sharpen:
        sharpen_self_attention(model)
    model = torch.nn.Module.to(model, device=device, dtype=torch_dtype)
    schedule = FlowSchedule() if entry["scheduler"] == "flow" else _ddim(entry["scheduler"])
    video = entry["video"]
    return Subject(spec, model, schedule, device, torch_dtype, sharpened=sharpen,
                   family=entry["family"], text_tokens=entry["text_tokens"], video=video,
                   frames=None if video is None else frames or video["frames"])


def _load_pipeline(path: str, kind: str, torch_dtype):
    import diffusers

    if kind == "folder":
        return diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype, local_files_only=True)
    from ..models.single_file import load_single_file

    return load_single_file(path, torch_dtype)
