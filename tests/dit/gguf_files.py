"""Random-weight GGUF files in the original single-file layouts that diffusers' ``from_single_file``
converts (Flux.1: ``double_blocks.0.img_attn.qkv.weight``...; Wan 2.1: ``blocks.0.self_attn.q.weight``...),
quantized as GGUF files of these models are: Q8_0 and Q4_K for the large matrices, F16 for small
matrices, F32 for norms and biases (and, as in real Wan files, the 5-D patch embedding and the
modulation tables).

``gguf`` quantizes Q8_0 (``gguf.quants.quantize``) but has no Q4_K quantizer, so ``quantize_q4_k``
here packs Q4_K blocks (the ggml layout: fp16 d and dmin, 12 bytes of 6-bit scales and mins, 128
bytes of 4-bit quants per 256 values) from a plain min/max fit; ``gguf.quants.dequantize`` reads them
back (tests/dit/test_quantized.py checks both against diffusers' own dequantization).

``cached_model`` writes each model once into $TOMESD_EXT_CACHE/gguf_files, keyed by a fingerprint
of this module (the Flux file, 0.3 GB, took ~40 s of a loaded 2-core machine to draw and quantize).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import torch

QK_K = 256


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks (rows, in/256 * 144) uint8 of a float matrix (rows, in), in % 256 == 0."""
    rows, n = x.shape
    assert n % QK_K == 0, "Q4_K needs rows of a multiple of 256 values"
    sub = x.astype(np.float32).reshape(-1, 8, 32)  # (blocks, sub-blocks, values)
    lo = np.minimum(sub.min(axis=2), 0.0)
    hi = sub.max(axis=2)
    scale = (hi - lo) / 15.0
    d = (scale.max(axis=1) / 63.0).astype(np.float16)
    dmin = (-lo.min(axis=1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin32 > 0, np.rint(-lo / dmin32), 0).clip(0, 63).astype(np.uint8)
        step = d32 * sc
        inv = np.where(step > 0, 1.0 / step, 0).astype(np.float32)  # per sub-block: one pass over the values
    q = sub + (dmin32 * mn)[:, :, None]
    q *= inv[:, :, None]
    np.rint(q, out=q)
    np.clip(q, 0, 15, out=q)
    q = q.astype(np.uint8)
    scales = np.zeros((sub.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # chunk c: sub-block 2c low nibble, 2c+1 high
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return blocks.reshape(rows, -1)


def write_gguf(path: str, tensors: dict, arch: str) -> None:
    """Write ``{name: (float array or tensor, qtype name)}`` as a GGUF file (qtype "Q8_0", "Q4_K",
    "F16", "F32")."""
    import gguf

    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, (x, qtype) in tensors.items():
        if isinstance(x, torch.Tensor):
            x = x.float().numpy()
        t = gguf.GGMLQuantizationType[qtype]
        if qtype == "Q4_K":
            data = quantize_q4_k(x)
        elif qtype == "Q8_0":
            data = gguf.quants.quantize(x.astype(np.float32), t)
        else:
            data = x.astype(np.float16 if qtype == "F16" else np.float32)
        writer.add_tensor(name, data, raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _kind(shape, big: str) -> str:
    """The quant type a GGUF conversion gives a weight: F32 for vectors and 5-D tensors, ``big`` for
    large matrices whose rows fit its blocks, Q8_0 where only 32-value blocks fit, F16 else."""
    if len(shape) != 2:
        return "F32"
    rows, n = shape
    if rows * n < 4096:
        return "F16"
    if big == "Q4_K" and n % 256 == 0:
        return "Q4_K"
    return "Q8_0" if n % 32 == 0 else "F16"


def quantized(state: dict, big: str) -> dict:
    """``{name: (tensor, qtype)}`` of a float state dict as a GGUF conversion stores it (see _kind),
    ``big`` ("Q8_0" or "Q4_K") for its large matrices; for write_gguf."""
    return {name: (t, _kind(tuple(t.shape), big)) for name, t in state.items()}


def random_tensors(shapes: dict, seed: int, quant: dict) -> dict:
    """``{name: (array, qtype)}``: Linear-like random weights (std 1/sqrt(fan_in)), small random
    biases, norm scales near 1; ``quant(name)`` picks "Q4_K" or "Q8_0" for a large matrix."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith(".scale") or ".norm" in name and name.endswith(".weight") and len(shape) == 1:
            x = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            x = 0.02 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            x = torch.randn(shape, generator=g) / fan_in**0.5
        out[name] = (x.numpy(), _kind(shape, quant(name)))
    return out


# Flux.1 -------------------------------------------------------------------------------------------

# diffusers' convert_flux_transformer_checkpoint_to_diffusers splits the single blocks' fused
# linear1 at inner_dim = 3072 (hard-coded), so a Flux GGUF loads only at the real width.
FLUX_WIDTH = 3072
FLUX_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True,
                   axes_dims_rope=[16, 56, 56])


def flux_shapes(cfg: dict) -> dict:
    """Names and shapes of a Flux.1 checkpoint in its original (BFL) layout."""
    D, head = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["attention_head_dim"]
    assert D == FLUX_WIDTH
    s = {}

    def linear(name, out, inp):
        s[f"{name}.weight"], s[f"{name}.bias"] = (out, inp), (out,)

    linear("time_in.in_layer", D, 256)
    linear("time_in.out_layer", D, D)
    linear("vector_in.in_layer", D, cfg["pooled_projection_dim"])
    linear("vector_in.out_layer", D, D)
    if cfg["guidance_embeds"]:
        linear("guidance_in.in_layer", D, 256)
        linear("guidance_in.out_layer", D, D)
    linear("txt_in", D, cfg["joint_attention_dim"])
    linear("img_in", D, cfg["in_channels"])
    for i in range(cfg["num_layers"]):
        p = f"double_blocks.{i}"
        for stream in ("img", "txt"):
            linear(f"{p}.{stream}_mod.lin", 6 * D, D)
            linear(f"{p}.{stream}_attn.qkv", 3 * D, D)
            linear(f"{p}.{stream}_attn.proj", D, D)
            s[f"{p}.{stream}_attn.norm.query_norm.scale"] = (head,)
            s[f"{p}.{stream}_attn.norm.key_norm.scale"] = (head,)
            linear(f"{p}.{stream}_mlp.0", 4 * D, D)
            linear(f"{p}.{stream}_mlp.2", D, 4 * D)
    for i in range(cfg["num_single_layers"]):
        p = f"single_blocks.{i}"
        linear(f"{p}.modulation.lin", 3 * D, D)
        linear(f"{p}.linear1", 3 * D + 4 * D, D)
        linear(f"{p}.linear2", D, D + 4 * D)
        s[f"{p}.norm.query_norm.scale"] = (head,)
        s[f"{p}.norm.key_norm.scale"] = (head,)
    linear("final_layer.linear", cfg["patch_size"] ** 2 * cfg["in_channels"], D)
    linear("final_layer.adaLN_modulation.1", 2 * D, D)
    return s


def flux_quant(name: str) -> str:
    """Q4_K for the down projections (MLP out, the single blocks' linear2), Q8_0 for the other
    matrices: both kinds in both block types, and CPU dequantization (at every forward) stays quick."""
    return "Q4_K" if any(k in name for k in ("_mlp.2", "linear2")) else "Q8_0"


# Wan 2.1 ------------------------------------------------------------------------------------------

WAN_CONFIG = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
                  text_dim=256, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                  eps=1e-6, rope_max_seq_len=64)


def wan_shapes(cfg: dict) -> dict:
    """Names and shapes of a Wan 2.1 text-to-video checkpoint in its original layout."""
    D, ffn = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]
    pt, ph, pw = cfg["patch_size"]
    s = {"patch_embedding.weight": (D, cfg["in_channels"], pt, ph, pw), "patch_embedding.bias": (D,)}

    def linear(name, out, inp):
        s[f"{name}.weight"], s[f"{name}.bias"] = (out, inp), (out,)

    linear("text_embedding.0", D, cfg["text_dim"])
    linear("text_embedding.2", D, D)
    linear("time_embedding.0", D, cfg["freq_dim"])
    linear("time_embedding.2", D, D)
    linear("time_projection.1", 6 * D, D)
    for i in range(cfg["num_layers"]):
        p = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                linear(f"{p}.{attn}.{proj}", D, D)
            s[f"{p}.{attn}.norm_q.weight"] = (D,)
            s[f"{p}.{attn}.norm_k.weight"] = (D,)
        s[f"{p}.norm3.weight"], s[f"{p}.norm3.bias"] = (D,), (D,)  # the cross-attention norm (diffusers' norm2)
        linear(f"{p}.ffn.0", ffn, D)
        linear(f"{p}.ffn.2", D, ffn)
        s[f"{p}.modulation"] = (1, 6, D)
    linear("head.head", cfg["out_channels"] * pt * ph * pw, D)
    s["head.modulation"] = (1, 2, D)
    return s


def wan_quant(name: str) -> str:
    """Q4_K for the feed-forwards, Q8_0 for attention and embeddings."""
    return "Q4_K" if ".ffn." in name else "Q8_0"


def write_model(tmp_dir: str, which: str, seed: int = 0):
    """(path of the .gguf file, config folder) of a random ``which`` ("flux" or "wan") checkpoint."""
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    if which == "flux":
        cfg, shapes, quant, cls, arch = FLUX_CONFIG, flux_shapes(FLUX_CONFIG), flux_quant, FluxTransformer2DModel, "flux"
    else:
        cfg, shapes, quant, cls, arch = WAN_CONFIG, wan_shapes(WAN_CONFIG), wan_quant, WanTransformer3DModel, "wan"
    path = os.path.join(tmp_dir, f"{which}-random.gguf")
    write_gguf(path, random_tensors(shapes, seed, quant), arch)
    config_dir = os.path.join(tmp_dir, f"{which}-config")
    os.makedirs(config_dir, exist_ok=True)
    with open(os.path.join(config_dir, "config.json"), "w") as f:
        json.dump(dict(cfg, _class_name=cls.__name__), f)
    return path, config_dir


def cached_model(which: str, seed: int = 0):
    """``write_model``'s (path, config folder), written once into $TOMESD_EXT_CACHE/gguf_files
    (default ~/.cache/tomesd_ext) under a fingerprint of this module; read them, never change them."""
    cache = os.environ.get("TOMESD_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tomesd_ext")
    with open(__file__, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:10]
    folder = os.path.join(cache, "gguf_files", f"{which}-seed{seed}-{digest}")
    if not os.path.isdir(folder):
        tmp = f"{folder}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write_model(tmp, which, seed)
        try:
            os.replace(tmp, folder)  # whole folder at once: never a half-written file under the name
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(folder, f"{which}-random.gguf"), os.path.join(folder, f"{which}-config")
