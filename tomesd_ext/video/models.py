"""Loading the diffusion pipeline and ControlNet of a video job.

model: a built-in random-weight name ("tiny", "sd15", "sd21"; tomesd_ext.models; the video
transformers "wan-tiny", "ltx-tiny", "wan-1.3b-depth4": models.video_pipeline) or a path to a
local diffusers folder (Stable Diffusion 1.x/2.x, or a Wan 2.1 / 2.2 or LTX-Video pipeline, told
apart by its model_index.json) / SD single-file checkpoint (.safetensors, .ckpt) / single-file Wan
2.1 / 2.2 TI2V-5B or LTX-Video transformer (.safetensors in the family's original key layout, as
shipped and as ComfyUI's model files; SINGLE_FILE_FAMILIES; loaded with diffusers'
from_single_file into the pipeline of that family named by ``pipeline``: a diffusers folder or a
built-in pipeline, which gives the VAE, text encoder, tokenizer, scheduler and the transformer's
config). The backend of
a model ("sd": VidToMe editing with DDIM; "flow": the flow methods of video.flow_editor) is
known before anything loads (``backend_of``). ControlNet: a local ControlNetModel folder, or for
built-in SD models a random-weight one shaped like the UNet.

sharpen: random weights give almost uniform self-attention (normalised entropy ~0.99,
docs/video.md "Random weights"), so which tokens attention sees barely matters and token merging
cannot change a random model's output much. The documented instrument is the sharpened variant
(`tomesd_ext.models.sharpen_self_attention`: to_k tied to to_q, both scaled). "auto" sharpens
built-in random-weight models by DEFAULT_SHARPEN and leaves real checkpoints alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


DEFAULT_SHARPEN = 2.0
# model_index.json class names of the video-transformer pipelines edit-video loads
FLOW_PIPELINES = ("WanPipeline", "WanVideoToVideoPipeline", "LTXPipeline", "LTXVideoToVideoPipeline",
                  "LTXConditionPipeline")


def _model_index(path: Path) -> dict:
    """A diffusers folder's model_index.json, or {} when there is none (or it is unreadable)."""
    import json

    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _pipeline_class(path: Path) -> Optional[str]:
    """The _class_name of a diffusers folder's model_index.json, or None."""
    return _model_index(path).get("_class_name")


# Single-file video transformers (by the family names of models.dit_configs): a family's key that only its original layout has (bare or with
# ComfyUI's prefix), the diffusers class that converts and loads it (from_single_file), the
# model_index.json classes of the pipelines that can hold it, and how errors name it.
SINGLE_FILE_FAMILIES = {
    "wan": {"keys": ("head.modulation",), "cls": "WanTransformer3DModel",
            "pipelines": ("WanPipeline", "WanVideoToVideoPipeline"), "label": "Wan"},
    "ltx-video": {"keys": ("patchify_proj.weight",), "cls": "LTXVideoTransformer3DModel",
            "pipelines": ("LTXPipeline", "LTXVideoToVideoPipeline", "LTXConditionPipeline"), "label": "LTX-Video"},
}
COMFY_PREFIX = "model.diffusion_model."


def single_file_family(model: str) -> Optional[str]:
    """"wan" / "ltx-video" for a .safetensors file holding a video transformer in that family's
    original key layout (SINGLE_FILE_FAMILIES), else None."""
    p = Path(str(model)).expanduser()
    if not (p.is_file() and p.suffix == ".safetensors"):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            keys = set(f.keys())
    except Exception:  # not a readable safetensors file: the SD loader reports it
        return None
    for family, entry in SINGLE_FILE_FAMILIES.items():
        if any(k in keys or COMFY_PREFIX + k in keys for k in entry["keys"]):
            return family
    return None


def backend_of(model: str) -> str:
    """"flow" for a built-in video transformer, a local Wan / LTX-Video diffusers folder or a
    single-file Wan / LTX-Video transformer, else "sd"."""
    from ..models.video_pipeline import VIDEO_PIPELINE_NAMES

    p = Path(str(model)).expanduser()
    if not p.exists():
        return "flow" if model in VIDEO_PIPELINE_NAMES else "sd"
    if p.is_file():
        return "flow" if single_file_family(model) else "sd"
    return "flow" if _pipeline_class(p) in FLOW_PIPELINES else "sd"


def _builtin_names(family: str) -> list:
    """The built-in video pipelines whose transformer is of ``family``."""
    from ..models.dit_configs import get_dit_config
    from ..models.video_pipeline import VIDEO_PIPELINES

    return [n for n, spec in VIDEO_PIPELINES.items() if get_dit_config(spec["transformer"])["family"] == family]


def check_pipeline_field(model: str, pipeline) -> None:
    """The `pipeline` a job pairs with its model: required for a single-file Wan / LTX-Video
    transformer (a diffusers folder or a built-in pipeline of the same family), refused otherwise
    (OptionError naming it)."""
    from ..core.options import OptionError

    family = single_file_family(model)
    if pipeline is None:
        if family:
            entry = SINGLE_FILE_FAMILIES[family]
            raise OptionError(f"model {model!r} is a single-file {entry['label']} transformer: set `pipeline` to "
                              f"the {entry['label']} pipeline around it (a local {entry['label']} diffusers folder, "
                              f"or a built-in: {_builtin_names(family)})")
        return
    if not family:
        raise OptionError(f"pipeline {pipeline!r} applies only when model is a single-file Wan or LTX-Video "
                          f"transformer (.safetensors in the original key layout); model {model!r} is not")
    entry, names = SINGLE_FILE_FAMILIES[family], _builtin_names(family)
    p = Path(str(pipeline)).expanduser()
    fits = (p.is_dir() and _pipeline_class(p) in entry["pipelines"]) or (not p.exists() and pipeline in names)
    if not fits:
        raise OptionError(f"pipeline {pipeline!r} is neither a local {entry['label']} diffusers folder "
                          f"(model_index.json of {' / '.join(entry['pipelines'])}) nor a built-in "
                          f"{entry['label']} pipeline {names} (model {model!r}: a {entry['label']} transformer)")
    second = _model_index(p).get("transformer_2") if p.is_dir() else None
    if isinstance(second, list) and second and second[0] is not None:
        raise OptionError(f"pipeline {pipeline!r} holds two transformers (Wan 2.2 A14B); a single file "
                          f"({model!r}) replaces one: use a diffusers folder of the pair as model instead")


def is_builtin(model: str) -> bool:
    """True for a built-in random-weight model name (no local path of that name exists)."""
    return not Path(str(model)).expanduser().exists()


def resolve_sharpen(model: str, sharpen="auto") -> float:
    """The self-attention sharpening scale to apply: "auto"/None -> DEFAULT_SHARPEN for built-in
    random-weight SD models and 0 (off) for local checkpoints and video transformers; a number
    >= 0 as given (0 = off; SD models only)."""
    from ..core.options import OptionError

    flow = backend_of(model) == "flow"
    if sharpen is None or sharpen == "auto":
        return DEFAULT_SHARPEN if is_builtin(model) and not flow else 0.0
    if isinstance(sharpen, str):
        try:
            sharpen = float(sharpen)
        except ValueError:
            sharpen = None
    if isinstance(sharpen, bool) or not isinstance(sharpen, (int, float)) or not 0 <= sharpen <= 64:
        raise OptionError(f"sharpen={sharpen!r} is out of range: allowed 'auto' or a number in [0, 64] (0 = off)")
    if flow and sharpen:
        raise OptionError(f"sharpen={sharpen!r}: sharpening applies to Stable Diffusion UNets; use 'auto' or 0 with {model!r}")
    return float(sharpen)


def model_id(model: str, sharpen: float = 0.0) -> str:
    """Identity of a loaded model (inversion cache keys): the name, plus the sharpening if any."""
    return f"{model}@sharpen{sharpen:g}" if sharpen else str(model)


def load_pipeline(model: str, seed: int = 0, dtype=None, sharpen: float = 0.0, pipeline: Optional[str] = None):
    """A StableDiffusionPipeline with a DDIM scheduler (progress bar off), or for a video
    transformer (backend "flow") its WanPipeline / LTXPipeline; a single-file Wan / LTX-Video
    transformer goes into the pipeline ``pipeline`` (check_pipeline_field). sharpen > 0 applies
    `sharpen_self_attention(pipe.unet, sharpen)` (see resolve_sharpen for the "auto" rule)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = dtype or torch.float32
    p = Path(model).expanduser()
    check_pipeline_field(model, pipeline)
    if pipeline is not None:
        return _load_single_file(p, pipeline, seed, dtype)
    if backend_of(model) == "flow":
        return _load_flow_pipeline(model, p, seed, dtype)
    if p.exists():
        if p.is_dir():
            pipe = StableDiffusionPipeline.from_pretrained(str(p), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        else:
            from ..models.single_file import load_single_file

            try:
                pipe = load_single_file(str(p), dtype)
            except ValueError as e:  # e.g. a Wan / LTX-Video transformer file
                raise ValueError(f"{e}; single files are read as SD 1.x/2.x checkpoints: give a Wan or LTX-Video "
                                 "model as a diffusers folder (with model_index.json), or a Wan / LTX-Video transformer "
                                 "file in the original key layout with `pipeline`") from e
            if not isinstance(pipe, StableDiffusionPipeline):
                raise ValueError(f"model {model!r} is an SDXL checkpoint; video editing supports SD1.x/2.x")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    else:
        from ..models import UNET_NAMES, build_pipeline

        if model not in UNET_NAMES or model.endswith("sdxl"):
            names = [n for n in UNET_NAMES if not n.endswith("sdxl")]
            from ..models.video_pipeline import VIDEO_PIPELINE_NAMES

            raise ValueError(f"model {model!r} is neither a local path nor a built-in model: SD1.x/2.x {names}, "
                             f"video transformers {list(VIDEO_PIPELINE_NAMES)}")
        pipe = build_pipeline(model, "txt2img", seed=seed, dtype=dtype, scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    if sharpen:
        from ..models import sharpen_self_attention

        sharpen_self_attention(pipe.unet, sharpen)
    return pipe


def _load_flow_pipeline(model: str, p: Path, seed: int, dtype):
    if not p.exists():
        from ..models.video_pipeline import build_video_pipeline

        return build_video_pipeline(model, seed=seed, dtype=dtype)
    import diffusers

    from .flow_editor import family_of

    pipe = getattr(diffusers, _pipeline_class(p)).from_pretrained(str(p), torch_dtype=dtype)
    family_of(pipe)  # a Wan / LTX-Video transformer, else a clear error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_single_file(path: Path, pipeline: str, seed: int, dtype):
    """The pipeline ``pipeline`` with its transformer loaded from the single file ``path`` (of a
    family of SINGLE_FILE_FAMILIES; diffusers' from_single_file, converting the original key
    layout; the transformer's config is the pipeline's: a file of another shape is an error naming
    both)."""
    import tempfile

    import diffusers

    cls = getattr(diffusers, SINGLE_FILE_FAMILIES[single_file_family(str(path))]["cls"])
    p = Path(str(pipeline)).expanduser()
    what = f"model {str(path)!r} does not fit pipeline {pipeline!r}"
    with tempfile.TemporaryDirectory() as tmp:
        if p.is_dir():
            config, sub, pipe = str(p), "transformer", None
        else:  # a built-in: its random transformer is replaced; its config goes through a folder
            pipe = _load_flow_pipeline(pipeline, p, seed, dtype)
            pipe.transformer.save_config(tmp)
            config, sub = tmp, None
        try:
            transformer = cls.from_single_file(str(path), config=config, subfolder=sub, torch_dtype=dtype,
                                               local_files_only=True)
        except (ValueError, RuntimeError, KeyError) as e:
            raise ValueError(f"{what}: {e}") from e
    if pipe is None:
        pipe = getattr(diffusers, _pipeline_class(p)).from_pretrained(str(p), transformer=transformer, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe.register_modules(transformer=transformer)
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
