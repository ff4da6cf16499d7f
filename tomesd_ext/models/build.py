"""Builders of random-weight SD1.5 / SD2.1 / SDXL models and pipelines (and their tiny twins).

Nothing is downloaded: every model comes from ``configs.CONFIGS`` with seeded weights
(``weights.build_seeded``). In ``build_pipeline`` the components draw from seeds
``seed`` (unet), ``seed + 1`` (vae), ``seed + 2`` / ``seed + 3`` (text encoders) and
``seed + 4`` (controlnet).
"""

import inspect

import diffusers
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .configs import get_config
from .tokenizer import build_tokenizer
from .weights import build_seeded, cast

SCHEDULERS = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "pndm": diffusers.PNDMScheduler,
}

PIPELINES = {
    "sd": {
        "txt2img": diffusers.StableDiffusionPipeline,
        "img2img": diffusers.StableDiffusionImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
        "controlnet": diffusers.StableDiffusionControlNetPipeline,
    },
    "sdxl": {
        "txt2img": diffusers.StableDiffusionXLPipeline,
        "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
        "controlnet": diffusers.StableDiffusionXLControlNetPipeline,
    },
}

# Turned off in every pipeline: no safety checker, image encoder or watermark.
_PIPELINE_EXTRAS = {
    "safety_checker": None,
    "feature_extractor": None,
    "image_encoder": None,
    "requires_safety_checker": False,
    "add_watermarker": False,
}


def build_unet(name, seed=0, dtype=torch.float32, device="cpu"):
    """Random-weight ``UNet2DConditionModel`` of model ``name``.

    Input ``sample`` (B, 4, H/8, W/8), ``timestep``, ``encoder_hidden_states``
    (B, 77, cross_attention_dim); SDXL names also need ``added_cond_kwargs``
    (``text_embeds`` (B, proj_dim), ``time_ids`` (B, 6)). Output ``.sample`` like the input.
    """
    config = get_config(name)["unet"]
    return build_seeded(lambda: UNet2DConditionModel(**config), seed, dtype, device)


def build_vae(name, seed=0, dtype=torch.float32, device="cpu"):
    """Random-weight ``AutoencoderKL``: image (B, 3, H, W) in [-1, 1] <-> latent (B, 4, H/8, W/8)."""
    config = get_config(name)["vae"]
    return build_seeded(lambda: AutoencoderKL(**config), seed, dtype, device)


def text_config(config, tokenizer) -> CLIPTextConfig:
    """The CLIPTextConfig of a text tower config, with the vocabulary and ids of ``tokenizer``."""
    ids = {
        "vocab_size": config["vocab_size"] or len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPTextConfig(**{**config, **ids})


def _text_encoder(config, tokenizer, with_projection, seed, dtype, device):
    clip_config = text_config(config, tokenizer)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return build_seeded(lambda: cls(clip_config), seed, dtype, device)


def build_text_encoders(name, seed=0, dtype=torch.float32, device="cpu"):
    """Tiny tokenizer(s) and random-weight CLIP text encoder(s) of model ``name``.

    Returns a dict of pipeline components: ``text_encoder`` (CLIPTextModel, seed ``seed``) and
    ``tokenizer``; SDXL names add ``text_encoder_2`` (CLIPTextModelWithProjection, seed
    ``seed + 1``) and ``tokenizer_2``. Ids (B, 77) -> hidden states (B, 77, hidden_size).
    """
    config = get_config(name)
    tokenizer = build_tokenizer()
    parts = {
        "text_encoder": _text_encoder(config["text_encoder"], tokenizer, False, seed, dtype, device),
        "tokenizer": tokenizer,
    }
    if config["text_encoder_2"] is not None:
        tokenizer_2 = build_tokenizer()
        parts["text_encoder_2"] = _text_encoder(
            config["text_encoder_2"], tokenizer_2, True, seed + 1, dtype, device
        )
        parts["tokenizer_2"] = tokenizer_2
    return parts


def build_scheduler(name, scheduler="ddim"):
    """Scheduler ``"ddim"``, ``"euler"``, ``"pndm"`` or ``"default"`` (the model's own class)
    with the model's training config (betas, 1000 steps, prediction type)."""
    config = get_config(name)["scheduler"]
    if scheduler == "default":
        cls = getattr(diffusers, config["_class_name"])
    elif scheduler in SCHEDULERS:
        cls = SCHEDULERS[scheduler]
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose default or {', '.join(SCHEDULERS)}")
    accepted = inspect.signature(cls.__init__).parameters
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


def build_controlnet(unet, seed=0, dtype=None):
    """``ControlNetModel`` shaped by ``ControlNetModel.from_unet(unet)``, sharing the UNet's
    encoder weights; its own layers (conditioning embedding, zero convolutions) get random
    nonzero weights so that the control image changes the result. Control image (B, 3, H, W).
    """
    dtype = dtype or unet.dtype

    def factory():
        return ControlNetModel.from_unet(unet, load_weights_from_unet=False)

    controlnet = build_seeded(factory, seed)
    shared = {k: v.float() for k, v in unet.state_dict().items() if k in controlnet.state_dict()}
    controlnet.load_state_dict(shared, strict=False)
    return cast(controlnet, unet.device, dtype)


def build_pipeline(name, kind="txt2img", seed=0, dtype=torch.float32, scheduler="ddim", device="cpu"):
    """Random-weight diffusers pipeline of model ``name`` for ``kind``.

    ``kind``: "txt2img", "img2img", "inpaint" (the base 4-channel UNet, as when inpainting with
    a base checkpoint) or "controlnet". SD names give ``StableDiffusion*Pipeline``, SDXL names
    ``StableDiffusionXL*Pipeline``; no safety checker, no watermark, progress bar off.
    """
    config = get_config(name)
    pipelines = PIPELINES[config["family"]]
    if kind not in pipelines:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(pipelines)}")
    unet = build_unet(name, seed, dtype, device)
    components = {
        "unet": unet,
        "vae": build_vae(name, seed + 1, dtype, device),
        "scheduler": build_scheduler(name, scheduler),
        **build_text_encoders(name, seed + 2, dtype, device),
    }
    if kind == "controlnet":
        components["controlnet"] = build_controlnet(unet, seed + 4)
    return assemble_pipeline(pipelines[kind], components)


def assemble_pipeline(cls, components):
    """Pipeline ``cls`` of ``components``, with the extras it accepts turned off, progress bar off."""
    accepted = inspect.signature(cls.__init__).parameters
    extras = {k: v for k, v in _PIPELINE_EXTRAS.items() if k in accepted}
    pipe = cls(**components, **extras)
    pipe.set_progress_bar_config(disable=True)
    return pipe
