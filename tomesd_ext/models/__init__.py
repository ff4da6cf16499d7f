"""Random-weight Stable Diffusion models (real and tiny configs), tokenizer and test helpers."""

from .build import (
    build_controlnet,
    build_pipeline,
    build_scheduler,
    build_text_encoders,
    build_unet,
    build_vae,
)
from .configs import CONFIGS, MODEL_NAMES, get_config
from .lora import random_lora
from .sharpen import sharpen_self_attention
from .tokenizer import build_tokenizer, write_tiny_tokenizer
from .weights import build_seeded, fill_random_weights

__all__ = [
    "CONFIGS",
    "MODEL_NAMES",
    "build_controlnet",
    "build_pipeline",
    "build_scheduler",
    "build_seeded",
    "build_text_encoders",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "fill_random_weights",
    "get_config",
    "random_lora",
    "sharpen_self_attention",
    "write_tiny_tokenizer",
]
