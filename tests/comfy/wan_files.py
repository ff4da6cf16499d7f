"""Seeded random-weight files for the Wan 2.1 text-to-video workflow, under the names it uses,
built from ComfyUI's own classes on the meta device (shapes only) and filled tensor by tensor:

- ``wan2.1_t2v_1.3B_fp16.safetensors``: the 1.3B model's width (dim 1536, 12 heads, ffn 8960,
  umT5 text width 4096) with 2 blocks instead of 30 (ComfyUI reads the depth from the file);
- ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``: umT5-XXL at its full configured size (ComfyUI
  builds it from umt5_config_xxl.json whatever the file holds: a file with fewer blocks would leave
  the missing ones uninitialised), stored in float8_e4m3fn (5.7 GB; ComfyUI then keeps it in fp8),
  with the sentencepiece model of ComfyUI's t5_pile tokenizer as ``spiece_model``. Only the token
  embedding is random; the blocks' matrices are zeros, left as holes of a sparse file
  (sparse_files.py), so the file is written in seconds and takes ~1 GB of disk. Zero blocks pass
  each token's embedding through to the final norm: the Wan model gets a finite context that
  depends on the prompt;
- ``wan_2.1_vae.safetensors``: the Wan 2.1 VAE layout at base width 16 instead of 96 (ComfyUI
  reads the width from the file).
"""

from __future__ import annotations

import math
import os

import torch

from sparse_files import write_once

FILES = {
    "diffusion_models": "wan2.1_t2v_1.3B_fp16.safetensors",
    "text_encoders": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae": "wan_2.1_vae.safetensors",
}


def _fill(meta: torch.nn.Module, dtype, seed: int, random=lambda name: True) -> dict:
    """Random tensors of a meta module's state dict: norms 1, biases 0, weights N(0, 1/fan_in); the
    weights whose name ``random`` rejects are zeros, as meta tensors (holes of the sparse file)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in meta.state_dict().items():
        if p.ndim == 1 and ("norm" in name or name.endswith("gamma")):
            out[name] = torch.ones(p.shape, dtype=dtype)
        elif name.endswith("bias") and p.ndim == 1:
            out[name] = torch.zeros(p.shape, dtype=dtype)
        elif not random(name):
            out[name] = torch.empty(p.shape, dtype=dtype, device="meta")
        else:
            fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[-1]
            t = torch.empty(p.shape, dtype=dtype)
            rows = max(1, (1 << 26) // max(1, t[0].numel())) if p.ndim > 1 else p.shape[0]
            for i in range(0, p.shape[0], rows):  # in slices: the 1B-entry embedding in fp32 at once is 4 GB
                chunk = torch.randn((min(rows, p.shape[0] - i),) + tuple(p.shape[1:]), generator=g)
                t[i : i + rows] = (chunk / math.sqrt(fan_in)).to(dtype)
            out[name] = t
    return out


def wan_model(dim=1536, ffn_dim=8960, num_layers=2):
    """ComfyUI's Wan 2.1 text-to-video model on the meta device (default: the 1.3B model's width with
    2 blocks; ComfyUI reads the width, depth and feed-forward width from a file, heads = dim / 128)."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    return WanModel(model_type="t2v", dim=dim, ffn_dim=ffn_dim, num_heads=dim // 128, num_layers=num_layers,
                    text_dim=4096, device="meta", operations=comfy.ops.disable_weight_init)


def _umt5(comfy_path):
    import json

    import comfy.ops
    from comfy.text_encoders.t5 import T5

    config = json.load(open(os.path.join(comfy_path, "comfy", "text_encoders", "umt5_config_xxl.json")))
    return T5(config, torch.float8_e4m3fn, "meta", comfy.ops.manual_cast)


def _vae():
    from comfy.ldm.wan.vae import WanVAE

    with torch.device("meta"):
        return WanVAE(dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True])


def wan_files(cache: str, comfy_path: str) -> dict:
    """{models subfolder: path} of the three files, written once into ``cache``."""
    os.makedirs(cache, exist_ok=True)
    paths = {sub: os.path.join(cache, name) for sub, name in FILES.items()}
    builders = {
        "diffusion_models": lambda: _fill(wan_model(), torch.float16, 0),
        "text_encoders": lambda: _umt5_state(comfy_path),
        "vae": lambda: _fill(_vae(), torch.float16, 2),
    }
    for sub, path in paths.items():
        write_once(path, builders[sub])
    return paths


def _umt5_state(comfy_path) -> dict:
    sd = _fill(_umt5(comfy_path), torch.float8_e4m3fn, 1, random=lambda name: name == "shared.weight")
    spiece = os.path.join(comfy_path, "comfy", "text_encoders", "t5_pile_tokenizer", "tokenizer.model")
    sd["spiece_model"] = torch.frombuffer(bytearray(open(spiece, "rb").read()), dtype=torch.uint8)
    return sd
