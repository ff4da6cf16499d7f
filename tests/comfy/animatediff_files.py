"""A seeded random-weight AnimateDiff motion module for SD 1.5 in the key layout of the published
``v3_sd15_mm.ckpt`` (what ComfyUI-AnimateDiff-Evolved loads from models/animatediff_models/):

- ``down_blocks.{0..3}.motion_modules.{0,1}`` and ``up_blocks.{0..3}.motion_modules.{0,1,2}``
  (no ``mid_block``: v3), at the SD 1.5 UNet widths 320, 640, 1280, 1280 (down; up reversed);
- each ``.temporal_transformer``: ``norm`` (GroupNorm), ``proj_in`` / ``proj_out`` (Linear C -> C),
  one ``transformer_blocks.0`` with two ``attention_blocks.{0,1}`` (``to_q``/``to_k``/``to_v``
  without bias, ``to_out.0``, ``pos_encoder.pe`` the sinusoidal table (1, 32, C)), their
  ``norms.{0,1}`` (LayerNorm), ``ff.net.0.proj`` (GEGLU, C -> 8C), ``ff.net.2`` (4C -> C), ``ff_norm``.

Weights are N(0, 1/fan_in) (``proj_out`` a tenth of that, so the random motion modules nudge the
random UNet's features instead of swamping them), norms 1, biases 0. The file is a torch pickle of
the state dict, as the published ``.ckpt`` (~0.8 GB in fp16), cached under $TOMESD_EXT_CACHE
keyed by a fingerprint of this module.
"""

from __future__ import annotations

import hashlib
import math
import os

import torch

MOTION_MODULE_NAME = "v3_sd15_mm.ckpt"  # the published file the example workflow names
WIDTHS = (320, 640, 1280, 1280)
PE_LENGTH = 32  # v3 (and v2): positions for 32 frames


def motion_module_shapes() -> dict:
    """key -> shape of the SD 1.5 v3 motion module."""
    shapes = {}
    blocks = [(f"down_blocks.{i}", c, 2) for i, c in enumerate(WIDTHS)]
    blocks += [(f"up_blocks.{i}", c, 3) for i, c in enumerate(reversed(WIDTHS))]
    for block, c, count in blocks:
        for m in range(count):
            p = f"{block}.motion_modules.{m}.temporal_transformer"
            shapes.update({f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,),
                           f"{p}.proj_in.weight": (c, c), f"{p}.proj_in.bias": (c,),
                           f"{p}.proj_out.weight": (c, c), f"{p}.proj_out.bias": (c,)})
            t = f"{p}.transformer_blocks.0"
            for a in range(2):
                att = f"{t}.attention_blocks.{a}"
                for proj in ("to_q", "to_k", "to_v"):
                    shapes[f"{att}.{proj}.weight"] = (c, c)
                shapes.update({f"{att}.to_out.0.weight": (c, c), f"{att}.to_out.0.bias": (c,),
                               f"{att}.pos_encoder.pe": (1, PE_LENGTH, c),
                               f"{t}.norms.{a}.weight": (c,), f"{t}.norms.{a}.bias": (c,)})
            shapes.update({f"{t}.ff.net.0.proj.weight": (8 * c, c), f"{t}.ff.net.0.proj.bias": (8 * c,),
                           f"{t}.ff.net.2.weight": (c, 4 * c), f"{t}.ff.net.2.bias": (c,),
                           f"{t}.ff_norm.weight": (c,), f"{t}.ff_norm.bias": (c,)})
    return shapes


def _positions(length: int, c: int) -> torch.Tensor:
    """The sinusoidal position table (1, length, c): sin on even channels, cos on odd ones."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, c, 2, dtype=torch.float32) * (-math.log(10000.0) / c))
    pe = torch.zeros(1, length, c)
    pe[0, :, 0::2] = torch.sin(pos * freq)
    pe[0, :, 1::2] = torch.cos(pos * freq)
    return pe


def motion_module_state_dict(seed: int = 0, dtype=torch.float16) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in motion_module_shapes().items():
        if key.endswith("pos_encoder.pe"):
            t = _positions(shape[1], shape[2])
        elif len(shape) == 1:
            t = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
            if ".proj_out." in key:
                t = t * 0.1
        out[key] = t.to(dtype)
    return out


def cached_motion_module(seed: int = 0) -> str:
    """Path of the cached motion module file of ``seed`` (written on first use)."""
    cache = os.environ.get("TOMESD_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tomesd_ext")
    with open(os.path.abspath(__file__), "rb") as f:
        tag = hashlib.sha1(f.read()).hexdigest()[:10]
    path = os.path.join(cache, f"animatediff-v3-sd15-seed{seed}-{tag}.ckpt")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        torch.save(motion_module_state_dict(seed), tmp)
        os.replace(tmp, path)
    return path
