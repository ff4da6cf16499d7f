"""AnimateDiff with random weights: a UNet of ``configs.CONFIGS`` plus a motion adapter, as a
diffusers ``UNetMotionModel`` and the AnimateDiff pipelines around it (tests and the bench).

The UNet draws from ``seed`` (``build_unet``) and the motion adapter from ``seed + 5``
(``build_seeded``; its sinusoidal position table is computed by its constructor); diffusers'
``UNetMotionModel.from_unet2d`` joins them. Pipelines take the VAE, text encoders and scheduler
of the base model (seeds as in ``build.build_pipeline``). Nothing is downloaded.
"""

import diffusers
import torch
from diffusers import MotionAdapter, SparseControlNetModel, UNetMotionModel

from .build import assemble_pipeline, build_controlnet, build_scheduler, build_text_encoders, build_unet, build_vae
from .sharpen import sharpen_self_attention
from .weights import build_seeded, cast

# The motion adapters of AnimateDiff's published checkpoints, by architecture: SD 1.5 (v1-5-2 /
# v3: two motion layers per level, a motion mid block, 32 frames of positions) and SDXL (beta: no
# motion mid block), and tiny twins with the tiny UNets' widths.
_SD15_ADAPTER = {
    "block_out_channels": (320, 640, 1280, 1280),
    "motion_layers_per_block": 2,
    "motion_mid_block_layers_per_block": 1,
    "motion_num_attention_heads": 8,
    "motion_norm_num_groups": 32,
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
}
_TINY_ADAPTER = {
    **_SD15_ADAPTER,
    "block_out_channels": (32, 64, 64),
    "motion_num_attention_heads": 2,
    "motion_norm_num_groups": 8,
}

MOTION_CONFIGS = {  # name -> (base UNet name of configs.CONFIGS, motion adapter config)
    "tiny-animatediff": ("tiny", _TINY_ADAPTER),
    "tiny-sdxl-animatediff": ("tiny-sdxl", {**_TINY_ADAPTER, "use_motion_mid_block": False}),
    "sd15-animatediff": ("sd15", _SD15_ADAPTER),
}
MOTION_NAMES = tuple(MOTION_CONFIGS)
# The bench's clip geometry (bench/video_inputs.py): SD's VAE, 8x spatial, no temporal compression
# (a latent frame per frame); the default clip of AnimateDiff's pipelines (16 frames, 512 px).
MOTION_VIDEO = {"channels": 4, "spatial": 8, "temporal": 1, "frames": 16, "height": 512, "width": 512}

ANIMATEDIFF_PIPELINES = {
    "sd": {
        "txt2img": diffusers.AnimateDiffPipeline,
        "video2video": diffusers.AnimateDiffVideoToVideoPipeline,
        "controlnet": diffusers.AnimateDiffControlNetPipeline,
        "sparsectrl": diffusers.AnimateDiffSparseControlNetPipeline,
        "video2video-controlnet": diffusers.AnimateDiffVideoToVideoControlNetPipeline,
    },
    "sdxl": {"txt2img": diffusers.AnimateDiffSDXLPipeline},
}


def _motion_config(name):
    if name not in MOTION_CONFIGS:
        raise ValueError(f"unknown AnimateDiff model {name!r}; choose one of {', '.join(MOTION_NAMES)}")
    return MOTION_CONFIGS[name]


def build_motion_adapter(name, seed=0):
    """Random-weight ``MotionAdapter`` of AnimateDiff model ``name`` (float32, CPU)."""
    _base, config = _motion_config(name)
    return build_seeded(lambda: MotionAdapter(**config), seed, keep_buffers=True)


def build_motion_unet(name, seed=0, dtype=torch.float32, device="cpu", adapter=None, sharpen=False):
    """Random-weight ``UNetMotionModel`` of AnimateDiff model ``name``: its base UNet (seed) with
    the motion adapter (``adapter``, else built from seed + 5). sharpen: the base UNet's spatial
    self-attention gets ``sharpen_self_attention`` (the bench's fidelity variant) before the
    motion modules join, so their temporal attention stays as drawn.

    Input ``sample`` (B, 4, frames, H/8, W/8), ``timestep``, ``encoder_hidden_states``
    (B * frames, tokens, cross_attention_dim) (one row per frame, clip b's at b*frames ..);
    SDXL names also need ``added_cond_kwargs`` as for ``build_unet``. Output ``.sample`` like the input.
    """
    base, _config = _motion_config(name)
    adapter = adapter if adapter is not None else build_motion_adapter(name, seed + 5)
    plain = build_unet(base, seed)
    if sharpen:
        sharpen_self_attention(plain)
    unet = UNetMotionModel.from_unet2d(plain, adapter)
    return cast(unet, device, dtype).eval()


def build_animatediff_pipeline(name, kind="txt2img", seed=0, scheduler="ddim"):
    """Random-weight AnimateDiff pipeline of model ``name`` (float32, CPU) for ``kind``.

    SD names: "txt2img" (``AnimateDiffPipeline``), "video2video", "controlnet" (a ControlNetModel
    of the base UNet, run per frame), "sparsectrl" (a SparseControlNetModel) and
    "video2video-controlnet"; SDXL names: "txt2img" (``AnimateDiffSDXLPipeline``). Components draw
    from seeds as in ``build_pipeline``; the adapter from seed + 5, a control net from seed + 4.
    """
    base, _config = _motion_config(name)
    family = "sdxl" if "sdxl" in base else "sd"
    pipelines = ANIMATEDIFF_PIPELINES[family]
    if kind not in pipelines:
        raise ValueError(f"unknown kind {kind!r} for {name}; choose one of {', '.join(pipelines)}")
    adapter = build_motion_adapter(name, seed + 5)
    unet = build_motion_unet(name, seed, adapter=adapter)
    components = {
        "unet": unet,
        "motion_adapter": adapter,
        "vae": build_vae(base, seed + 1),
        "scheduler": build_scheduler(base, scheduler),
        **build_text_encoders(base, seed + 2),
    }
    if "controlnet" in kind:
        components["controlnet"] = build_controlnet(build_unet(base, seed), seed + 4)
    elif kind == "sparsectrl":
        plain = build_unet(base, seed)  # from_unet rewrites its config's block types
        components["controlnet"] = build_seeded(
            lambda: SparseControlNetModel.from_unet(plain, load_weights_from_unet=False, conditioning_channels=4),
            seed + 4, keep_buffers=True)
    return assemble_pipeline(pipelines[kind], components)
