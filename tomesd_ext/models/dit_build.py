"""Builders of random-weight diffusion transformers (``dit_configs.DIT_CONFIGS``), nothing downloaded.

Weights are seeded (``weights.build_seeded``, parameters only on the meta device so RoPE and
position tables are computed as usual). Full-depth models that do not fit a 24 GB CPU machine
in fp32 raise a ValueError naming their reduced-depth variant unless ``allow_large=True``.
"""

import torch

from .dit_configs import get_dit_config
from .weights import build_seeded

FP32_LIMIT_GB = 16.0  # weights of a model built by default: leaves room for activations in 24 GB


def transformer_class(family):
    """The diffusers class of a family (flux, flux2, sd3, pixart, qwen-image, z-image, wan, ltx-video,
    hunyuan-video)."""
    import diffusers

    names = {
        "flux": "FluxTransformer2DModel",
        "flux2": "Flux2Transformer2DModel",
        "sd3": "SD3Transformer2DModel",
        "pixart": "PixArtTransformer2DModel",
        "qwen-image": "QwenImageTransformer2DModel",
        "z-image": "ZImageTransformer2DModel",
        "wan": "WanTransformer3DModel",
        "ltx-video": "LTXVideoTransformer3DModel",
        "hunyuan-video": "HunyuanVideoTransformer3DModel",
    }
    if family not in names:
        raise KeyError(f"unknown family {family!r}; choose one of {', '.join(names)}")
    return getattr(diffusers, names[family])


def _factory(entry):
    cls = transformer_class(entry["family"])
    return lambda: cls(**entry["transformer"])


def meta_transformer(name):
    """The transformer of ``name`` on the meta device (no memory): shapes and parameter counts."""
    entry = get_dit_config(name)
    with torch.device("meta"):
        return _factory(entry)()


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


def too_large(name):
    """The reason full-depth model ``name`` is not built by default (naming its reduced-depth
    variant), or None when it fits (fp32 weights <= FP32_LIMIT_GB)."""
    entry = get_dit_config(name)
    if not entry["use_instead"]:
        return None
    gb = parameter_count(meta_transformer(name)) * 4 / 1e9
    if gb <= FP32_LIMIT_GB:
        return None
    return (f"model {name!r} ({entry['source']}, full depth) needs {gb:.1f} GB of fp32 weights, more than "
            f"{FP32_LIMIT_GB:g} GB on a 24 GB machine; use {entry['use_instead']!r} (same block width, fewer blocks)")


def build_transformer(name, seed=0, dtype=torch.float32, device="cpu", allow_large=False):
    """Random-weight diffusers transformer of model ``name`` (one of ``DIT_NAMES``).

    Forward signatures differ per family; ``tomesd_ext.bench.dit_inputs`` builds them. Raises
    ValueError for a full-depth model over ``FP32_LIMIT_GB`` of fp32 weights, naming the
    reduced-depth variant to use (``allow_large=True`` builds it anyway, e.g. on a GPU).
    """
    reason = None if allow_large else too_large(name)
    if reason:
        raise ValueError(reason)
    return build_seeded(_factory(get_dit_config(name)), seed, dtype, device, keep_buffers=True)
