"""Loading a single-file (original layout) .safetensors checkpoint into a diffusers pipeline,
offline.

diffusers' ``from_single_file`` needs the pipeline's component configs; without a local
Hugging Face cache it downloads them. Offline we write them ourselves from the built-in
architecture configs (tomesd_ext.models.configs) into a folder and pass it as ``config``. That
folder's tokenizer is our tiny one (no vocabulary can be downloaded): the weights are the
checkpoint's, but text prompts are tokenized with a small vocabulary, so prompt-driven results
are not the model's real behaviour. Speed and merged-vs-unmerged agreement of the UNet are.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from .build import PIPELINES, build_scheduler, text_config
from .tokenizer import build_tokenizer
from .configs import get_config

# Single-file key prefixes of the text towers, by family (original LDM / SGM layouts).
_SDXL_KEY = "conditioner.embedders.1."
_SD2_KEY = "cond_stage_model.model."


_CANDIDATES = {"sd1": ("sd15", "tiny"), "sd2": ("sd21", "tiny-sd2"), "sdxl": ("sdxl", "tiny-sdxl")}
_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def builtin_architecture(path: str) -> str:
    """The built-in model name whose architecture a single-file checkpoint has: the family from
    the text tower's keys (SDXL: ``conditioner.embedders.1.``, SD2: ``cond_stage_model.model.``,
    else SD1), the size from the UNet's first convolution (320 channels: full size)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        if _CONV_IN not in keys:
            raise ValueError(f"{path!r} is not a Stable Diffusion single-file checkpoint (no {_CONV_IN})")
        width = f.get_slice(_CONV_IN).get_shape()[0]
    if any(k.startswith(_SDXL_KEY) for k in keys):
        family = "sdxl"
    elif any(k.startswith(_SD2_KEY) for k in keys):
        family = "sd2"
    else:
        family = "sd1"
    names = _CANDIDATES[family]
    return next((n for n in names if get_config(n)["unet"]["block_out_channels"][0] == width), names[0])


def write_config_folder(name: str, folder: str) -> str:
    """Write the txt2img pipeline configs of built-in model ``name`` (no weights) into ``folder``:
    model_index.json, {unet,vae,text_encoder(_2),scheduler}/ configs and the tiny tokenizer(s).
    Returns folder."""
    import json

    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = get_config(name)
    with torch.device("meta"):  # configs only: no weights are allocated
        parts = {"unet": UNet2DConditionModel(**config["unet"]), "vae": AutoencoderKL(**config["vae"])}
    parts["scheduler"] = build_scheduler(name, "default")
    cls = PIPELINES[config["family"]]["txt2img"]
    index = {"_class_name": cls.__name__, "_diffusers_version": diffusers.__version__}
    for key, part in parts.items():
        index[key] = ["diffusers", type(part).__name__]
        part.save_config(os.path.join(folder, key))
    towers = [("", "CLIPTextModel", config["text_encoder"])]
    if config["text_encoder_2"] is not None:
        towers.append(("_2", "CLIPTextModelWithProjection", config["text_encoder_2"]))
    for suffix, model_class, tower in towers:
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(os.path.join(folder, "tokenizer" + suffix))
        text_config(tower, tokenizer).save_pretrained(os.path.join(folder, "text_encoder" + suffix))
        index["tokenizer" + suffix] = ["transformers", type(tokenizer).__name__]
        index["text_encoder" + suffix] = ["transformers", model_class]
    if config["family"] == "sd":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return folder


def load_single_file(path: str, torch_dtype=torch.float32, name: Optional[str] = None, config_dir: Optional[str] = None):
    """A txt2img pipeline from a single-file checkpoint, without network access.

    Tries diffusers' own configs (from a local Hugging Face cache) first; otherwise writes the
    built-in configs of the detected architecture (`builtin_architecture`) to
    ``config_dir`` (default: ``config-<name>`` in the tomesd_ext cache) and loads with them, with
    a warning about the tokenizer. ``name`` forces a built-in architecture. A checkpoint whose shapes differ from the built-in architecture
    fails with a ValueError that says so.
    """
    name = name or builtin_architecture(path)
    cls = PIPELINES[get_config(name)["family"]]["txt2img"]
    try:
        return cls.from_single_file(path, torch_dtype=torch_dtype, local_files_only=True)
    except Exception:  # noqa: BLE001 - no cached hub config: use the built-in one
        pass
    folder = config_dir or os.path.join(
        os.environ.get("TOMESD_EXT_CACHE") or os.path.expanduser("~/.cache/tomesd_ext"), f"config-{name}"
    )
    write_config_folder(name, folder)
    warnings.warn(
        f"{os.path.basename(path)}: no Hugging Face config cached; loading with the built-in {name} "
        "configs and the tiny built-in tokenizer (text prompts are not tokenized as the real model's)",
        stacklevel=2,
    )
    try:
        return cls.from_single_file(path, config=folder, torch_dtype=torch_dtype, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"cannot load {path!r} with the built-in {name} architecture ({err}); convert it to a "
            "diffusers folder (save_pretrained) and pass that folder"
        ) from err
