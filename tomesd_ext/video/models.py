"""Loading the diffusion pipeline and ControlNet of a video job.

model: a built-in random-weight name ("tiny", "sd15", "sd21"; tomesd_ext.models) or a path to a
local diffusers folder / single-file checkpoint (.safetensors, .ckpt). ControlNet: a local
ControlNetModel folder, or for built-in models a random-weight one shaped like the UNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def load_pipeline(model: str, seed: int = 0, dtype=None):
    """A StableDiffusionPipeline with a DDIM scheduler (progress bar off)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = dtype or torch.float32
    p = Path(model).expanduser()
    if p.exists():
        if p.is_dir():
            pipe = StableDiffusionPipeline.from_pretrained(str(p), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        else:
            from ..models.single_file import load_single_file

            pipe = load_single_file(str(p), dtype)
            if not isinstance(pipe, StableDiffusionPipeline):
                raise ValueError(f"model {model!r} is an SDXL checkpoint; video editing supports SD1.x/2.x")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    else:
        from ..models import MODEL_NAMES, build_pipeline

        if model not in MODEL_NAMES or model.endswith("sdxl"):
            names = [n for n in MODEL_NAMES if not n.endswith("sdxl")]
            raise ValueError(f"model {model!r} is neither a local path nor a built-in SD1.x/2.x model {names}")
        pipe = build_pipeline(model, "txt2img", seed=seed, dtype=dtype, scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_controlnet(path: Optional[str], pipe, builtin: bool, seed: int = 0):
    """The ControlNet of a job that uses control: a local ControlNetModel folder when `path` is
    given, else (only for built-in random-weight models) a random-weight ControlNet shaped like
    the UNet (tomesd_ext.models.build_controlnet)."""
    if path:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ValueError(f"controlnet {path!r} is not an existing local ControlNet folder")
        from diffusers import ControlNetModel

        return ControlNetModel.from_pretrained(str(p), torch_dtype=pipe.unet.dtype)
    if not builtin:
        raise ValueError("control with a local checkpoint needs a local ControlNet: set the job's `controlnet` path")
    from ..models import build_controlnet

    return build_controlnet(pipe.unet, seed + 4)
