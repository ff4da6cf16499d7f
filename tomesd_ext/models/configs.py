"""Architecture configs (plain data) of SD1.5, SD2.1, SDXL and their tiny test twins.

Each entry of ``CONFIGS`` holds the ``config.json`` contents of one model's components:
``unet`` (UNet2DConditionModel), ``vae`` (AutoencoderKL), ``text_encoder`` (CLIPTextModel),
``text_encoder_2`` (CLIPTextModelWithProjection, SDXL only, else None) and ``scheduler``.
Real entries copy the published configs; tiny ones keep the topology (where attention sits,
linear projections, v-prediction, SDXL's text_time conditioning) at toy widths.
A text encoder ``vocab_size`` of None means "the size of the tiny tokenizer".
"""

import copy

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_XL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
_XL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]

_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "prediction_type": "epsilon",
}
_SCHEDULER_V = {**_SCHEDULER, "prediction_type": "v_prediction"}
_SCHEDULER_XL = {**_SCHEDULER, "interpolation_type": "linear", "timestep_spacing": "leading"}

_SD_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": _SD_DOWN,
    "up_block_types": _SD_UP,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}

_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_CLIP_L = {  # openai/clip-vit-large-patch14 text tower (SD1.x, SDXL text_encoder)
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-05,
}

SD15 = {
    "family": "sd",
    "unet": _SD_UNET,
    "vae": _SD_VAE,
    "text_encoder": _CLIP_L,
    "text_encoder_2": None,
    "scheduler": {"_class_name": "PNDMScheduler", **_SCHEDULER},
}

# SD1.5 at its real width (320 channels, 8 heads, CLIP-L's 768-wide context; the SD1.5 VAE and
# text encoder whole) with the UNet cut to its first level, one layer per block: attention at d=1
# (what ToMe merges), in the middle block and in the up block. ComfyUI detects it as SD1.5 (by width
# and context size) and compiles its UNet in a fraction of the full one's time (the stacking
# workflow's test).
SD15_1LEVEL = {
    **SD15,
    "unet": {
        **_SD_UNET,
        "down_block_types": ["CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D"],
        "block_out_channels": [320],
        "layers_per_block": 1,
    },
}

SD21 = {  # stabilityai/stable-diffusion-2-1 (768-v)
    "family": "sd",
    "unet": {
        **_SD_UNET,
        "sample_size": 96,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    "vae": {**_SD_VAE, "sample_size": 768},
    "text_encoder": {  # OpenCLIP ViT-H/14 text tower, penultimate layer kept (23 of 24)
        **_CLIP_L,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "hidden_act": "gelu",
        "projection_dim": 512,
    },
    "text_encoder_2": None,
    "scheduler": {"_class_name": "DDIMScheduler", **_SCHEDULER_V},
}

SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0
    "family": "sdxl",
    "unet": {
        **_SD_UNET,
        "sample_size": 128,
        "down_block_types": _XL_DOWN,
        "up_block_types": _XL_UP,
        "block_out_channels": [320, 640, 1280],
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoder": _CLIP_L,
    "text_encoder_2": {  # OpenCLIP ViT-bigG/14 text tower
        **_CLIP_L,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    },
    "scheduler": {"_class_name": "EulerDiscreteScheduler", **_SCHEDULER_XL},
}

_TINY_UNET = {
    **_SD_UNET,
    "sample_size": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}

_TINY_VAE = {
    **_SD_VAE,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 128,
}

_TINY_CLIP = {
    **_CLIP_L,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "vocab_size": None,
}

TINY = {  # SD1.x topology: attention at d=1 and d=2, none at the deepest level
    "family": "sd",
    "unet": _TINY_UNET,
    "vae": _TINY_VAE,
    "text_encoder": _TINY_CLIP,
    "text_encoder_2": None,
    "scheduler": {"_class_name": "PNDMScheduler", **_SCHEDULER},
}

TINY_SD2 = {  # SD2.x topology: linear projections, upcast attention, v-prediction
    "family": "sd",
    "unet": {**_TINY_UNET, "attention_head_dim": [2, 4, 4],
             "use_linear_projection": True, "upcast_attention": True},
    "vae": _TINY_VAE,
    "text_encoder": {**_TINY_CLIP, "hidden_act": "gelu"},
    "text_encoder_2": None,
    "scheduler": {"_class_name": "DDIMScheduler", **_SCHEDULER_V},
}

TINY_SDXL = {  # SDXL topology: no attention at d=1, deeper levels with more layers
    "family": "sdxl",
    "unet": {
        **_TINY_UNET,
        "down_block_types": _XL_DOWN,
        "up_block_types": _XL_UP,
        "transformer_layers_per_block": [1, 2, 2],
        "attention_head_dim": [2, 4, 4],
        "cross_attention_dim": 64,  # text_encoder hidden + text_encoder_2 hidden
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,  # 6 * 8 + projection_dim 32
    },
    "vae": {**_TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoder": _TINY_CLIP,
    "text_encoder_2": {**_TINY_CLIP, "hidden_act": "gelu"},
    "scheduler": {"_class_name": "EulerDiscreteScheduler", **_SCHEDULER_XL},
}

CONFIGS = {
    "tiny": TINY,
    "tiny-sd2": TINY_SD2,
    "tiny-sdxl": TINY_SDXL,
    "sd15": SD15,
    "sd15-1level": SD15_1LEVEL,
    "sd21": SD21,
    "sdxl": SDXL,
}

MODEL_NAMES = tuple(CONFIGS)


def get_config(name):
    """Deep copy of the component configs of model ``name`` (one of ``MODEL_NAMES``)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return copy.deepcopy(CONFIGS[name])
