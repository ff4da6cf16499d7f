"""Architecture configs (plain data) of the diffusion transformers and their reduced/tiny twins.

Each entry of ``DIT_CONFIGS``: ``family`` (flux, flux2, sd3, pixart, qwen-image, z-image; the
video families wan, ltx-video, hunyuan-video come from ``video_configs``),
``source`` (the Hugging Face repository whose ``transformer/config.json`` the numbers copy),
``transformer`` (the constructor arguments of the family's diffusers class), ``scheduler`` ("flow": rectified flow, sigma = t / 1000;
else the DDPM training config of the denoiser), ``cfg`` (whether
the real pipeline runs classifier-free guidance: batch 2 = uncond + cond; guidance-distilled
models run batch 1), ``text_tokens`` (the text sequence one forward sees, as the pipeline pads
or a typical prompt gives), and for full-depth models too large for a 24 GB CPU machine in
fp32, ``use_instead``: the reduced-depth variant to run (same block width, fewer blocks).
``video``: None for image models, the VAE geometry and default clip of video models
(``video_configs``). Tiny entries keep each family's structure (block kinds, qk norm, RoPE axes, joint/single
streams, patching) at toy widths, for tests.
"""

import copy

from .video_configs import VIDEO_CONFIGS

FLUX1_DEV = {  # black-forest-labs/FLUX.1-dev
    "patch_size": 1,
    "in_channels": 64,  # 16 VAE channels x 2x2 packed patches
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL
    "pooled_projection_dim": 768,  # CLIP-L pooled
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

FLUX2_DEV = {  # black-forest-labs/FLUX.2-dev
    "patch_size": 1,
    "in_channels": 128,  # 32 VAE channels x 2x2 packed patches
    "out_channels": None,
    "num_layers": 8,
    "num_single_layers": 48,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,  # Mistral-Small-3.1: 3 hidden layers of 5120 stacked
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "eps": 1e-06,
    "guidance_embeds": True,
}

SD35_LARGE = {  # stabilityai/stable-diffusion-3.5-large
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "dual_attention_layers": [],
    "qk_norm": "rms_norm",
}

SD35_MEDIUM = {  # stabilityai/stable-diffusion-3.5-medium (MMDiT-X: extra image self-attention)
    **SD35_LARGE,
    "num_layers": 24,
    "num_attention_heads": 24,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
}

PIXART_SIGMA = {  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,  # epsilon and learned variance
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 128,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "interpolation_scale": None,
    "use_additional_conditions": False,
    "caption_channels": 4096,  # T5-XXL
    "attention_type": "default",
}

QWEN_IMAGE = {  # Qwen/Qwen-Image
    "patch_size": 2,
    "in_channels": 64,  # 16 VAE channels x 2x2 packed patches
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,  # Qwen2.5-VL-7B
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}

Z_IMAGE_TURBO = {  # Tongyi-MAI/Z-Image-Turbo
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "cap_feat_dim": 2560,  # Qwen3-4B
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}


PIXART_SIGMA_SCHEDULER = {  # the DPMSolverMultistepScheduler config of PixArt-Sigma: DDPM betas
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def _entry(family, source, transformer, cfg, text_tokens, use_instead=None):
    scheduler = PIXART_SIGMA_SCHEDULER if family == "pixart" else "flow"
    return {"family": family, "source": source, "transformer": transformer, "scheduler": scheduler, "cfg": cfg,
            "text_tokens": text_tokens, "use_instead": use_instead, "video": None}


_FLUX1 = "black-forest-labs/FLUX.1-dev"
_FLUX2 = "black-forest-labs/FLUX.2-dev"
_SD35L = "stabilityai/stable-diffusion-3.5-large"
_SD35M = "stabilityai/stable-diffusion-3.5-medium"
_PIXART = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
_QWEN = "Qwen/Qwen-Image"
_ZIMAGE = "Tongyi-MAI/Z-Image-Turbo"
_TINY = "tiny (structure of {}, toy widths)"

# Text tokens: Flux.1 and Flux.2 pad T5 / Mistral prompts to 512; SD3 joins CLIP-L+G (77) and
# T5 (256) = 333; PixArt-Sigma pads T5 to 300. Qwen-Image and Z-Image pass the prompt unpadded
# (Z-Image pads to a multiple of 32 inside the model): 128 tokens stand for a typical prompt.
DIT_CONFIGS = {
    "flux": _entry("flux", _FLUX1, FLUX1_DEV, False, 512, use_instead="flux-depth4"),
    "flux-depth4": _entry("flux", _FLUX1, {**FLUX1_DEV, "num_layers": 2, "num_single_layers": 2}, False, 512),
    "flux2": _entry("flux2", _FLUX2, FLUX2_DEV, False, 512, use_instead="flux2-depth2"),
    "flux2-depth2": _entry("flux2", _FLUX2, {**FLUX2_DEV, "num_layers": 1, "num_single_layers": 1}, False, 512),
    "sd35-large": _entry("sd3", _SD35L, SD35_LARGE, True, 333, use_instead="sd35-large-depth2"),
    "sd35-large-depth2": _entry("sd3", _SD35L, {**SD35_LARGE, "num_layers": 2}, True, 333),
    "sd35-medium": _entry("sd3", _SD35M, SD35_MEDIUM, True, 333),
    "pixart-sigma": _entry("pixart", _PIXART, PIXART_SIGMA, True, 300),
    "qwen-image": _entry("qwen-image", _QWEN, QWEN_IMAGE, True, 128, use_instead="qwen-image-depth2"),
    "qwen-image-depth2": _entry("qwen-image", _QWEN, {**QWEN_IMAGE, "num_layers": 2}, True, 128),
    "z-image": _entry("z-image", _ZIMAGE, Z_IMAGE_TURBO, False, 128, use_instead="z-image-depth2"),
    "z-image-depth2": _entry("z-image", _ZIMAGE, {**Z_IMAGE_TURBO, "n_layers": 2}, False, 128),
    "tiny-flux": _entry("flux", _TINY.format(_FLUX1), {
        **FLUX1_DEV, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
        "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": [4, 6, 6]}, False, 16),
    "tiny-flux2": _entry("flux2", _TINY.format(_FLUX2), {
        **FLUX2_DEV, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
        "joint_attention_dim": 48, "timestep_guidance_channels": 16, "axes_dims_rope": [4, 4, 4, 4]}, False, 16),
    "tiny-sd3": _entry("sd3", _TINY.format(_SD35M), {
        **SD35_MEDIUM, "sample_size": 32, "num_layers": 3, "attention_head_dim": 16, "num_attention_heads": 2,
        "joint_attention_dim": 32, "caption_projection_dim": 32, "pooled_projection_dim": 16,
        "pos_embed_max_size": 64, "dual_attention_layers": [0]}, True, 16),
    "tiny-pixart": _entry("pixart", _TINY.format(_PIXART), {
        **PIXART_SIGMA, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
        "cross_attention_dim": 32, "caption_channels": 48}, True, 16),
    "tiny-qwen-image": _entry("qwen-image", _TINY.format(_QWEN), {
        **QWEN_IMAGE, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
        "joint_attention_dim": 32, "axes_dims_rope": [4, 6, 6]}, True, 16),
    "tiny-z-image": _entry("z-image", _TINY.format(_ZIMAGE), {
        **Z_IMAGE_TURBO, "dim": 64, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2,
        "cap_feat_dim": 32, "axes_dims": [8, 12, 12]}, False, 16),
}
DIT_CONFIGS.update(VIDEO_CONFIGS)

DIT_NAMES = tuple(DIT_CONFIGS)


def get_dit_config(name):
    """Deep copy of the entry of diffusion transformer ``name`` (one of ``DIT_NAMES``)."""
    if name not in DIT_CONFIGS:
        raise KeyError(f"unknown diffusion transformer {name!r}; choose one of {', '.join(DIT_NAMES)}")
    return copy.deepcopy(DIT_CONFIGS[name])
