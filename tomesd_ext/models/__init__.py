"""Random-weight Stable Diffusion models and diffusion transformers (real, reduced-depth and tiny
configs), tokenizer and test helpers."""

from .build import (
    build_controlnet,
    build_pipeline,
    build_scheduler,
    build_text_encoders,
    build_unet,
    build_vae,
)
from .configs import CONFIGS, get_config
from .dit_build import build_transformer, meta_transformer, parameter_count, too_large
from .dit_call import LATENT_CHANNELS, dit_call, text_conditioning
from .dit_configs import DIT_CONFIGS, DIT_NAMES, get_dit_config
from .lora import random_lora
from .motion import MOTION_CONFIGS, MOTION_NAMES, build_animatediff_pipeline, build_motion_adapter, build_motion_unet
from .sharpen import sharpen_self_attention
from .tokenizer import build_tokenizer, write_tiny_tokenizer
from .weights import build_seeded, fill_random_weights

UNET_NAMES = tuple(CONFIGS)
MODEL_NAMES = UNET_NAMES + MOTION_NAMES + DIT_NAMES  # every built-in name `tomesd-ext bench --model` accepts


def model_family(name):
    """"unet" for the SD/SDXL names, "animatediff" for a UNet with motion modules, else the
    diffusion-transformer family (flux, sd3, ...)."""
    if name in CONFIGS:
        return "unet"
    if name in MOTION_CONFIGS:
        return "animatediff"
    return get_dit_config(name)["family"]

__all__ = [
    "CONFIGS",
    "DIT_CONFIGS",
    "DIT_NAMES",
    "LATENT_CHANNELS",
    "MODEL_NAMES",
    "MOTION_CONFIGS",
    "MOTION_NAMES",
    "UNET_NAMES",
    "build_animatediff_pipeline",
    "build_controlnet",
    "build_pipeline",
    "build_scheduler",
    "build_motion_adapter",
    "build_motion_unet",
    "build_seeded",
    "build_text_encoders",
    "build_tokenizer",
    "build_transformer",
    "dit_call",
    "build_unet",
    "build_vae",
    "fill_random_weights",
    "get_config",
    "get_dit_config",
    "meta_transformer",
    "model_family",
    "parameter_count",
    "random_lora",
    "sharpen_self_attention",
    "text_conditioning",
    "too_large",
    "write_tiny_tokenizer",
]
