"""Write a diffusers SD1.x model as an original single-file checkpoint (LDM key layout).

ComfyUI's ``CheckpointLoaderSimple`` (and A1111, and diffusers' ``from_single_file``) read the
layout of the original CompVis release: one state dict with the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the CLIP text encoder under
``cond_stage_model.transformer.``. This module renames our random-weight diffusers components
(``build.build_unet`` / ``build_vae`` / ``build_text_encoders``) into that layout, so workflows can
run on weights that need no download.

Supported: SD1.x-shaped models (CLIP-L text encoder, conv or linear transformer projections).
SD2.x and SDXL store their OpenCLIP text towers in another format that is not written here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Dict

import torch

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _rename_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_key(key: str, layers_per_block: int, up_has_attention) -> str:
    """Diffusers UNet2DConditionModel key -> LDM ``UNetModel`` key (without the model prefix).

    Down block i, layer j is input block 1 + i*(L+1) + j (resnet at .0, transformer at .1); its
    downsampler is input block (i+1)*(L+1). Up block i, layer j is output block i*(L+1) + j; its
    upsampler sits after the resnet (and transformer, when the block has one) of the last layer.
    """
    L = layers_per_block
    for src, dst in _UNET_TOP.items():
        if key.startswith(src + "."):
            return dst + key[len(src):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + i * (L + 1) + j
        return f"input_blocks.{index}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_rename_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = i * (L + 1) + j
        return f"output_blocks.{index}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        i = int(m[1])
        slot = 2 if up_has_attention[i] else 1
        return f"output_blocks.{i * (L + 1) + L}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def unet_state_dict(unet) -> Dict[str, torch.Tensor]:
    """LDM-named state dict (prefix ``model.diffusion_model.``) of a diffusers UNet2DConditionModel."""
    L = unet.config.layers_per_block
    if not isinstance(L, int):
        raise ValueError(f"layers_per_block must be one int for the LDM layout, got {L!r}")
    up_attn = [bool(getattr(block, "attentions", None)) for block in unet.up_blocks]
    return {
        "model.diffusion_model." + unet_key(k, L, up_attn): v for k, v in unet.state_dict().items()
    }


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, n_levels: int) -> str:
    """Diffusers AutoencoderKL key -> LDM ``AutoencoderKL`` key (without the model prefix).

    Encoder level i is ``down.i``; decoder up block i is ``up.(n_levels-1-i)`` (the LDM decoder
    counts levels from the highest resolution).
    """
    def resnet(rest):
        head, _, tail = rest.partition(".")
        return f"{_VAE_RESNET.get(head, head)}.{tail}"

    for part in ("encoder", "decoder"):
        if key.startswith(f"{part}.conv_norm_out."):
            return f"{part}.norm_out." + key.split(".", 2)[2]
    m = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key)
    if m:
        if m[2] not in _VAE_ATTN:
            raise KeyError(f"no LDM name for VAE key {key!r}")
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def vae_state_dict(vae) -> Dict[str, torch.Tensor]:
    """LDM-named state dict (prefix ``first_stage_model.``); attention projections become 1x1 convs."""
    n_levels = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        name = vae_key(k, n_levels)
        if ".mid.attn_1." in name and name.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out["first_stage_model." + name] = v
    return out


def clip_state_dict(text_encoder) -> Dict[str, torch.Tensor]:
    """HF CLIPTextModel keys under ``cond_stage_model.transformer.text_model.`` (the SD1.5 release
    layout, which ComfyUI and diffusers' single-file loader both detect). Some transformers
    versions name the keys with a ``text_model.`` prefix, others without: both map alike."""
    prefix = "cond_stage_model.transformer.text_model."
    return {prefix + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def checkpoint_state_dict(unet, vae, text_encoder, dtype=torch.float16) -> Dict[str, torch.Tensor]:
    """The whole single-file state dict, tensors contiguous and cast to ``dtype`` (floats only)."""
    sd = {**unet_state_dict(unet), **vae_state_dict(vae), **clip_state_dict(text_encoder)}
    return {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()
    }


def write_checkpoint(path, name: str = "sd15", seed: int = 0, dtype=torch.float16) -> str:
    """Build random-weight model ``name`` (seeds as in ``build_pipeline``: unet ``seed``, vae
    ``seed + 1``, text encoder ``seed + 2``) and save it as a ``.safetensors`` single file.

    The same (name, seed) gives the same UNet as ``build_unet(name, seed)`` rounded to ``dtype``.
    Returns ``path``. Only SD1.x-shaped names are supported ("sd15", "sd15-1level", and "tiny", whose CLIP
    text tower has the same key layout; ComfyUI detects only the full-size one).
    """
    from safetensors.torch import save_file

    from .build import build_text_encoders, build_unet, build_vae
    from .configs import get_config

    config = get_config(name)
    if config["family"] != "sd" or (config["unet"].get("cross_attention_dim") != 768 and name != "tiny"):
        raise ValueError(f"write_checkpoint supports SD1.x-shaped models (e.g. 'sd15'), not {name!r}")
    sd = checkpoint_state_dict(
        build_unet(name, seed),
        build_vae(name, seed + 1),
        build_text_encoders(name, seed + 2)["text_encoder"],
        dtype,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "tomesd_ext": f"{name} seed={seed} random weights"})
    return str(path)


def cached_checkpoint(cache_dir, name: str = "sd15", seed: int = 0, dtype=torch.float16) -> str:
    """Path of the checkpoint of (name, seed) in ``cache_dir``, written on first use.

    The file name carries a fingerprint of what decides its content: the config of ``name`` and
    the builder sources (weights, build and this module), so a change to how weights are drawn or
    named writes a new file, while adding or editing another model's config keeps this one (each
    such file is 0.5-2 GB).
    """
    from .configs import get_config

    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha1(json.dumps(get_config(name), sort_keys=True, default=repr).encode())
    for part in ("weights.py", "build.py", "checkpoint.py"):
        with open(os.path.join(here, part), "rb") as f:
            digest.update(f.read())
    tag = str(dtype).replace("torch.", "")
    path = os.path.join(str(cache_dir), f"{name}-seed{seed}-{tag}-{digest.hexdigest()[:10]}.safetensors")
    if not os.path.exists(path):
        tmp = path + f".tmp{os.getpid()}"
        write_checkpoint(tmp, name, seed, dtype)
        os.replace(tmp, path)
    return path
