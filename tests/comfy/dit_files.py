"""Random-weight model files for serving the SD3.5 and Flux.1 workflows in ComfyUI.

Key names and shapes come from ComfyUI's own classes built on the meta device (nothing is
allocated there); the values are seeded random (matrices ~ N(0, 1/fan_in), norm weights 1,
biases 0), written in fp16 and cached in $TOMESD_EXT_CACHE/dit_files:

- ``sd35_files``: a checkpoint as CheckpointLoaderSimple reads an SD3.5 one: a 2-block MMDiT
  (ComfyUI detects the width as 64 x depth: 128, 2 heads; context 4096, pooled 2048 as SD3.5's)
  under ``model.diffusion_model.`` and ComfyUI's full-size 16-channel VAE under
  ``first_stage_model.``;
- ``clip_file("l" | "g")``: the full-size CLIP-L / CLIP-bigG text encoders DualCLIPLoader
  (type sd3) reads (ComfyUI builds them at their configured size whatever the file holds);
- ``flux_files``: the files of flux1_txt2img_tome (see there).
"""

from __future__ import annotations

import json
import os

import torch

from comfy_env import import_comfy
from sparse_files import write_once

VERSION = "v1"  # bump when the builders below change (the cache is keyed by it)
SD3_DEPTH, SD3_POS_EMBED = 2, 32


def _cache_dir() -> str:
    cache = os.environ.get("TOMESD_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tomesd_ext")
    path = os.path.join(cache, "dit_files")
    os.makedirs(path, exist_ok=True)
    return path


def _random_like(shapes, seed: int, dtype=torch.float16, matrices="random"):
    """{name: meta tensor} -> {name: random tensor of dtype} (see the module docstring).
    matrices="zeros": weight matrices are zeros, as meta tensors that _write leaves as holes of a sparse
    file (written in a moment; for a model whose values do not matter)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sorted(shapes.items()):
        if t.ndim >= 2 and matrices == "zeros":
            out[name] = torch.empty(t.shape, dtype=dtype, device="meta")
        elif t.ndim >= 2:
            fan_in = t[0].numel()
            out[name] = (torch.randn(t.shape, generator=g) / fan_in ** 0.5).to(dtype)
        elif name.endswith("weight") or name.endswith("scale"):
            out[name] = torch.ones(t.shape).to(dtype)
        else:
            out[name] = torch.zeros(t.shape).to(dtype)
    return out


def _write(name: str, build) -> str:
    return write_once(os.path.join(_cache_dir(), f"{name}-{VERSION}.safetensors"), build)


def _meta_state(module_fn):
    with torch.device("meta"):
        return dict(module_fn().state_dict())


def mmdit_meta(depth: int, qk_norm=None):
    """{name: meta tensor} of ComfyUI's MMDiT at ``depth`` (ComfyUI reads the width as 64 x depth,
    depth heads of 64), SD3.5's context (4096) and pooled (2048) widths; qk_norm="rms": SD3.5 Large's
    per-head query/key norms."""
    import_comfy()
    import comfy.ldm.modules.diffusionmodules.mmdit
    import comfy.ops

    hidden = 64 * depth
    return _meta_state(lambda: comfy.ldm.modules.diffusionmodules.mmdit.MMDiT(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=depth, num_patches=SD3_POS_EMBED ** 2,
        pos_embed_max_size=SD3_POS_EMBED, adm_in_channels=2048, pos_embed_scaling_factor=None, qk_norm=qk_norm,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": hidden}},
        operations=comfy.ops.disable_weight_init))


def _sd35_state():
    state = {f"model.diffusion_model.{k}": v for k, v in mmdit_meta(SD3_DEPTH).items()}
    state.update({f"first_stage_model.{k}": v for k, v in _vae_meta().items()})
    return _random_like(state, seed=0)


def _vae_meta():
    """ComfyUI's 16-channel VAE (SD3's and Flux's) on the meta device."""
    import comfy.ldm.models.autoencoder

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    return _meta_state(lambda: comfy.ldm.models.autoencoder.AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig}))


def sd35_files() -> list:
    """[(models folder, file name, path)] of the SD3.5 workflow's files (see the module docstring)."""
    return [("checkpoints", "sd3.5_large.safetensors", _write(f"sd35_mmdit{SD3_DEPTH}_vae", _sd35_state)),
            ("text_encoders", "clip_l.safetensors", clip_file("l")),
            ("text_encoders", "clip_g.safetensors", clip_file("g"))]


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


def flux_meta(depth: int = 1, depth_single_blocks: int = 1):
    """{name: meta tensor} of ComfyUI's Flux.1-dev class at the real width (ComfyUI detects Flux.1
    only at 3072 = 24 heads x 128) with ``depth`` double and ``depth_single_blocks`` single blocks."""
    import_comfy()
    import comfy.ldm.flux.model
    import comfy.ops

    return _meta_state(lambda: comfy.ldm.flux.model.Flux(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
        mlp_ratio=4.0, num_heads=24, depth=depth, depth_single_blocks=depth_single_blocks, axes_dim=[16, 56, 56],
        theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
        operations=comfy.ops.disable_weight_init))


def flux_model_file() -> str:
    """The Flux.1-dev diffusion model of flux_files (1 double + 1 single block, bf16, ~0.5B parameters)."""
    return _write("flux_1double_1single", lambda: _random_like(flux_meta(), seed=3, dtype=torch.bfloat16))


def flux_files() -> list:
    """[(models folder, file name, path)] of the Flux.1-dev workflow's files: a 1 double + 1 single block
    Flux (ComfyUI detects Flux.1 only at width 3072 = 24 heads x 128; bf16, ~0.5B parameters) as
    flux1-dev.safetensors, T5-XXL at its full size in fp8 (ComfyUI keeps a T5 file's dtype;
    4.7B parameters, ~4.8 GB), CLIP-L, and the 16-channel VAE as ae.safetensors."""
    import_comfy()
    import comfy.ops
    import comfy.text_encoders.t5

    def t5xxl():
        with open(os.path.join(os.path.dirname(comfy.text_encoders.t5.__file__), "t5_config_xxl.json")) as f:
            config = json.load(f)
        state = _meta_state(lambda: comfy.text_encoders.t5.T5(config, torch.float16, None, comfy.ops.disable_weight_init))
        # The text encoder only has to produce a finite context for the Flux model under test: zero
        # matrices give zeros and write in a moment (a sparse file) instead of minutes.
        return _random_like(state, seed=4, dtype=torch.float8_e4m3fn, matrices="zeros")

    return [
        ("diffusion_models", "flux1-dev.safetensors", flux_model_file()),
        ("text_encoders", "t5xxl_fp16.safetensors", _write("t5xxl_fp8_zeros", t5xxl)),
        ("text_encoders", "clip_l.safetensors", clip_file("l")),
        ("vae", "ae.safetensors", _write("vae16", lambda: _random_like(_vae_meta(), seed=5))),
    ]
