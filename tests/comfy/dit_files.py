"""Random-weight model files for serving the SD3.5 workflow (sd35_txt2img_tome) in ComfyUI.

Key names and shapes come from ComfyUI's own classes built on the meta device (nothing is
allocated there); the values are seeded random (matrices ~ N(0, 1/fan_in), norm weights 1,
biases 0), written in fp16 and cached in $TOMESD_EXT_CACHE/dit_files:

- ``sd35_checkpoint``: a checkpoint as CheckpointLoaderSimple reads an SD3.5 one: a 2-block MMDiT
  (ComfyUI detects the width as 64 x depth: 128, 2 heads; context 4096, pooled 2048 as SD3.5's)
  under ``model.diffusion_model.`` and ComfyUI's full-size 16-channel VAE under
  ``first_stage_model.``;
- ``clip_file("l" | "g")``: the full-size CLIP-L / CLIP-bigG text encoders DualCLIPLoader
  (type sd3) reads (ComfyUI builds them at their configured size whatever the file holds).
"""

from __future__ import annotations

import json
import os

import torch

from comfy_env import import_comfy

VERSION = "v1"  # bump when the builders below change (the cache is keyed by it)
SD3_DEPTH, SD3_POS_EMBED = 2, 32


def _cache_dir() -> str:
    cache = os.environ.get("TOMESD_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tomesd_ext")
    path = os.path.join(cache, "dit_files")
    os.makedirs(path, exist_ok=True)
    return path


def _random_like(shapes, seed: int):
    """{name: meta tensor} -> {name: fp16 random tensor} (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sorted(shapes.items()):
        if t.ndim >= 2:
            fan_in = t[0].numel()
            out[name] = (torch.randn(t.shape, generator=g) / fan_in ** 0.5).half()
        elif name.endswith("weight") or name.endswith("scale"):
            out[name] = torch.ones(t.shape, dtype=torch.float16)
        else:
            out[name] = torch.zeros(t.shape, dtype=torch.float16)
    return out


def _write(name: str, build) -> str:
    from safetensors.torch import save_file

    path = os.path.join(_cache_dir(), f"{name}-{VERSION}.safetensors")
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}.tmp"
        save_file(build(), tmp)
        os.replace(tmp, path)
    return path


def _meta_state(module_fn):
    with torch.device("meta"):
        return dict(module_fn().state_dict())


def _sd35_state():
    import_comfy()
    import comfy.ldm.models.autoencoder
    import comfy.ldm.modules.diffusionmodules.mmdit
    import comfy.ops

    hidden = 64 * SD3_DEPTH
    mmdit = _meta_state(lambda: comfy.ldm.modules.diffusionmodules.mmdit.MMDiT(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=SD3_DEPTH, num_patches=SD3_POS_EMBED ** 2,
        pos_embed_max_size=SD3_POS_EMBED, adm_in_channels=2048, pos_embed_scaling_factor=None,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": hidden}},
        operations=comfy.ops.disable_weight_init))
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = _meta_state(lambda: comfy.ldm.models.autoencoder.AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig}))
    state = {f"model.diffusion_model.{k}": v for k, v in mmdit.items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    return _random_like(state, seed=0)


def sd35_checkpoint() -> str:
    return _write(f"sd35_mmdit{SD3_DEPTH}_vae", _sd35_state)


def clip_file(which: str) -> str:
    """which: "l" (CLIP-L, 123M parameters) or "g" (CLIP-bigG, 694M)."""
    import_comfy()
    import comfy.clip_model
    import comfy.ops

    if which not in ("l", "g"):
        raise ValueError(f"which={which!r}: expected 'l' or 'g'")
    config_file = "sd1_clip_config.json" if which == "l" else "clip_config_bigg.json"
    with open(os.path.join(os.path.dirname(comfy.clip_model.__file__), config_file)) as f:
        config = json.load(f)

    def build():
        state = _meta_state(lambda: comfy.clip_model.CLIPTextModel(config, torch.float16, None, comfy.ops.disable_weight_init))
        return _random_like(state, seed=1 if which == "l" else 2)

    return _write(f"clip_{which}", build)
