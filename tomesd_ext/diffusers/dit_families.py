"""Where diffusers' image transformers keep what DiT merging attaches to (diffusers 0.42 classes).

A family is a few facts, no algorithm: which block lists run in order, where the image tokens
sit in a block's sequence and in its attention's sequence, how the call tells the image grid,
and which positional inputs of a block must follow merged tokens (``gather_span`` in core).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from ..core.dit import gather_span


@dataclass(frozen=True)
class CallInfo:
    """One transformer call: the image token grid (h, w), the text length, the timestep, the
    latent input (importance mode reads its CFG layout)."""

    grid: Optional[Tuple[int, int]]
    n_txt: int
    timestep: object
    sample: object = None


@dataclass(frozen=True)
class BlockList:
    """A ModuleList of blocks. hidden: the argument holding the token sequence; joined: that
    sequence is [text, image...] (image span starts after the text) rather than image tokens
    first; attn_joined: likewise for the sequence its attention processor receives; attentions:
    the attention modules whose queries and keys are image tokens (keys/values-only mode)."""

    name: str
    hidden: str
    joined: bool
    attn_joined: bool
    attentions: Tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """name: the core family key (DIT_DEFAULTS); text_first: the attention sequence is [text,
    image] (else image first); read: (bound forward arguments, model) -> CallInfo; positions:
    (bound block arguments, plan, n_txt) -> None, gathers positional inputs in place, or returns a
    reason the call cannot merge."""

    name: str
    lists: Tuple[BlockList, ...]
    text_first: bool
    read: Callable
    positions: Callable


def _grid_from_ids(ids, axes=(1, 2)):
    """(h, w) of the first image in position ids (N, k) or (B, N, k), when its tokens come first
    and fill a full h x w raster; else None."""
    if ids is None:
        return None
    if ids.ndim == 3:
        ids = ids[0]
    first = ids[:, 0] == ids[0, 0]
    n = int(first.sum())
    if not bool(first[:n].all()):
        return None
    rows, cols = ids[:n, axes[0]], ids[:n, axes[1]]
    h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
    return (h, w) if h * w == n else None


def _n_txt(a) -> int:
    enc = a.get("encoder_hidden_states")
    return int(enc.shape[1]) if enc is not None and hasattr(enc, "shape") else 0


def _read_flux(a, model):
    return CallInfo(_grid_from_ids(a.get("img_ids")), _n_txt(a), a.get("timestep"), a.get("hidden_states"))


def _read_patched_latent(a, model):
    x, p = a.get("hidden_states"), model.config.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p) if x is not None and x.ndim == 4 else None
    return CallInfo(grid, _n_txt(a), a.get("timestep"), x)


def _read_qwen(a, model):
    shapes, grid = a.get("img_shapes"), None
    try:
        first = shapes[0][0] if isinstance(shapes[0], list) else shapes[0]
        if int(first[0]) == 1:
            grid = (int(first[1]), int(first[2]))
    except (TypeError, IndexError, ValueError):
        grid = None
    return CallInfo(grid, _n_txt(a), a.get("timestep"), a.get("hidden_states"))


def _read_z_image(a, model):
    x, p, fp = a.get("x"), a.get("patch_size", 2), a.get("f_patch_size", 1)
    grid = None
    if isinstance(x, (list, tuple)) and x and hasattr(x[0], "shape") and x[0].ndim == 4 and a.get("siglip_feats") is None:
        _, f, h, w = x[0].shape
        if f // fp == 1 and all(tuple(t.shape) == tuple(x[0].shape) for t in x):
            grid = (h // p, w // p)
    return CallInfo(grid, 0, a.get("t"), x)


def _rotary_after_text(a, plan, n_txt):
    emb = a.get("image_rotary_emb")
    if emb is not None:
        a["image_rotary_emb"] = tuple(gather_span(t, plan, n_txt, 0) for t in emb)


def _qwen_positions(a, plan, n_txt):
    emb = a.get("image_rotary_emb")
    if emb is not None:
        a["image_rotary_emb"] = (gather_span(emb[0], plan, 0, 0),) + tuple(emb[1:])
    if a.get("modulate_index") is not None:
        a["modulate_index"] = gather_span(a["modulate_index"], plan, 0, 1)


def _z_image_positions(a, plan, n_txt):
    if a.get("noise_mask") is not None:
        return "per-token modulation (omni inputs)"
    for name in ("attn_mask", "freqs_cis"):
        if a.get(name) is not None:
            a[name] = gather_span(a[name], plan, 0, 1)


def _pixart_positions(a, plan, n_txt):
    if a.get("attention_mask") is not None:
        return "a self-attention mask"


def _none(a, plan, n_txt):
    return None


FAMILIES = {
    "FluxTransformer2DModel": Family(
        "flux",
        (BlockList("transformer_blocks", "hidden_states", False, False, ("attn",)),
         BlockList("single_transformer_blocks", "hidden_states", False, True, ("attn",))),
        True, _read_flux, _rotary_after_text,
    ),
    "Flux2Transformer2DModel": Family(
        "flux2",
        (BlockList("transformer_blocks", "hidden_states", False, False, ("attn",)),
         BlockList("single_transformer_blocks", "hidden_states", True, True, ("attn",))),
        True, _read_flux, _rotary_after_text,
    ),
    "SD3Transformer2DModel": Family(
        "sd3", (BlockList("transformer_blocks", "hidden_states", False, False, ("attn", "attn2")),),
        False, _read_patched_latent, _none,
    ),
    "QwenImageTransformer2DModel": Family(
        "qwen-image", (BlockList("transformer_blocks", "hidden_states", False, False, ("attn",)),),
        True, _read_qwen, _qwen_positions,
    ),
    "ZImageTransformer2DModel": Family(
        "z-image", (BlockList("layers", "x", False, False, ("attention",)),), False, _read_z_image, _z_image_positions,
    ),
    "PixArtTransformer2DModel": Family(
        "pixart", (BlockList("transformer_blocks", "hidden_states", False, False, ("attn1",)),),
        False, _read_patched_latent, _pixart_positions,
    ),
}

SUPPORTED_DITS = ", ".join(FAMILIES)


def family_of(model) -> Optional[Family]:
    """The family of a diffusers transformer (by class, subclasses included), or None."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES and cls.__module__.startswith("diffusers"):
            return FAMILIES[cls.__name__]
    return None


def bind(fn, args, kwargs):
    """inspect.BoundArguments of a call (defaults not applied): read and change by name."""
    return inspect.signature(fn).bind(*args, **kwargs)
