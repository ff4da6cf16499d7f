"""Where diffusers' image transformers keep what DiT merging attaches to (diffusers 0.42 classes).

A family is a few facts, no algorithm: which block lists run in order, where the image tokens
sit in a block's sequence and in its attention's sequence, how the call tells the image grid,
and which positional inputs of a block must follow merged tokens (``gather_span`` in core).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

import torch

from ..core.dit import gather_span


@dataclass(frozen=True)
class CallInfo:
    """One transformer call: the image token grid (h, w) or video token grid (frames, h, w), the
    text length, the timestep, the latent input (importance mode reads its CFG layout), ``lead``:
    image tokens before the grid in the block's sequence (LTX-Video conditioning tokens), never
    merged; ``reason``: why a call with image tokens has no grid to merge (said once per patch)."""

    grid: Optional[Tuple[int, ...]]
    n_txt: int
    timestep: object
    sample: object = None
    lead: int = 0
    reason: Optional[str] = None


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
    out: int = -1  # which output of the block is the token sequence, when it returns several


@dataclass(frozen=True)
class Family:
    """name: the core family key (DIT_DEFAULTS); text_first: the attention sequence is [text,
    image] (else image first); read: (bound forward arguments, model) -> CallInfo; positions:
    (bound block arguments, plan, span) -> None, gathers positional inputs in place, or returns a
    reason the call cannot merge; span.n_txt is the call's text length, span.lead the image tokens
    before the merged span (the first frame when it is kept). predicts: the model's output is a
    prediction of the latent, which importance mode takes its map from (a ControlNet's residuals
    are none: it plans with ToMe's windows, as a UNet ControlNetModel does)."""

    name: str
    lists: Tuple[BlockList, ...]
    text_first: bool
    read: Callable
    positions: Callable
    predicts: bool = True


_ids_seen: list = []  # [(weakref to the ids tensor, its version, axes, grid)]: the last ids read


def _grid_from_ids(ids, axes=(1, 2)):
    """(h, w) of the first image in position ids (N, k) or (B, N, k), when its tokens come first
    and fill a full h x w raster; else None.

    One host read per new ids tensor: pipelines pass the same ids at every step, so a sampling
    run reads them once (on a GPU each read waits for the device)."""
    if ids is None:
        return None
    if _ids_seen:
        ref, version, seen_axes, grid = _ids_seen[0]
        if ref() is ids and version == ids._version and seen_axes == axes:
            return grid
    flat = ids[0] if ids.ndim == 3 else ids
    first = flat[:, 0] == flat[0, 0]
    lead = first.long().cumprod(0).bool()  # the leading run of the first image's tokens
    rows, cols = flat[:, axes[0]].float(), flat[:, axes[1]].float()
    big = torch.finfo(torch.float32).max
    stats = torch.stack([
        first.sum().float(), lead.sum().float(),
        torch.where(lead, rows, -big).max(), torch.where(lead, rows, big).min(),
        torch.where(lead, cols, -big).max(), torch.where(lead, cols, big).min(),
    ])
    n, n_lead, r_max, r_min, c_max, c_min = (int(v) for v in stats.tolist())
    h, w = r_max - r_min + 1, c_max - c_min + 1
    grid = (h, w) if n == n_lead and h * w == n else None
    _ids_seen[:] = [(weakref.ref(ids), ids._version, axes, grid)]
    return grid


def _n_txt(a) -> int:
    enc = a.get("encoder_hidden_states")
    return int(enc.shape[1]) if enc is not None and hasattr(enc, "shape") else 0


def _read_flux(a, model):
    return CallInfo(_grid_from_ids(a.get("img_ids")), _n_txt(a), a.get("timestep"), a.get("hidden_states"))


def _read_flux_controlnet(a, model):
    """FluxControlNetModel: ControlNet-Union (``num_mode`` set) puts the embedding of
    ``controlnet_mode`` before the text tokens (and one more text id before the rotary table's
    image part), so every block's text is one token longer than ``encoder_hidden_states``."""
    info = _read_flux(a, model)
    if getattr(model, "union", False) and a.get("controlnet_mode") is not None:
        info = replace(info, n_txt=info.n_txt + 1)
    return info


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
    return CallInfo(grid, _n_txt(a), _call_timestep(a.get("timestep")), a.get("hidden_states"))


def _read_z_image(a, model):
    """x is a list of per-sample latents (C, F, H, W); every sample's image tokens come first in
    its sequence. One plan serves the call, so all samples must share one grid."""
    x, p, fp = a.get("x"), a.get("patch_size", 2), a.get("f_patch_size", 1)
    grid, reason = None, None
    if isinstance(x, (list, tuple)) and x and hasattr(x[0], "shape") and x[0].ndim == 4 and a.get("siglip_feats") is None:
        _, f, h, w = x[0].shape
        if any(tuple(t.shape[1:]) != tuple(x[0].shape[1:]) for t in x):
            reason = ("images of different sizes in one batch (one merge plan serves every sample of a call, and "
                      "their image token spans differ in length; call the transformer once per size to merge them)")
        elif f // fp == 1:
            grid = (h // p, w // p)
    return CallInfo(grid, 0, a.get("t"), x, reason=reason)


def _gather(a, name, plan, start, dim, element=None):
    """Gather argument ``name`` (or element ``element`` of a tuple argument) at the plan's anchors."""
    value = a.get(name)
    if value is None:
        return
    if element is None:
        a[name] = gather_span(value, plan, start, dim)
    elif element == "all":
        a[name] = tuple(gather_span(t, plan, start, dim) for t in value)
    else:
        a[name] = tuple(gather_span(t, plan, start, dim) if i == element else t for i, t in enumerate(value))


def _rotary_after_text(a, plan, span):
    _gather(a, "image_rotary_emb", plan, span.n_txt + span.lead, 0, "all")


def _qwen_positions(a, plan, span):
    _gather(a, "image_rotary_emb", plan, span.lead, 0, 0)
    _gather(a, "modulate_index", plan, span.lead, 1)


def _z_image_positions(a, plan, span):
    if a.get("noise_mask") is not None:
        return "per-token modulation (omni inputs)"
    _gather(a, "attn_mask", plan, span.lead, 1)
    _gather(a, "attention_mask", plan, span.lead, 1)  # the same mask, as the attention module takes it
    _gather(a, "freqs_cis", plan, span.lead, 1)


def _pixart_positions(a, plan, span):
    if a.get("attention_mask") is not None:
        return "a self-attention mask"


def _wan_positions(a, plan, span):
    _gather(a, "rotary_emb", plan, span.lead, 1, "all")
    temb = a.get("temb")
    if temb is not None and temb.ndim == 4:  # per-token modulation (Wan 2.2 TI2V)
        _gather(a, "temb", plan, span.lead, 1)


def _hunyuan_positions(a, plan, span):
    extra = a.get("args") or ()
    replace = a.get("token_replace_emb", extra[0] if extra else None)
    first_frame = a.get("num_tokens", extra[1] if len(extra) > 1 else None)
    if replace is not None and first_frame is not None and span.lead < int(first_frame):
        return "image-to-video token replace (pass keep_first_frame=True)"
    key = "image_rotary_emb" if "image_rotary_emb" in a else "freqs_cis"
    _gather(a, key, plan, span.lead, 0, "all")
    mask = a.get("attention_mask")
    if mask is not None:
        a["attention_mask"] = gather_span(mask, plan, span.lead, mask.ndim - 1)


def _ltx_positions(a, plan, span):
    _gather(a, "image_rotary_emb", plan, span.lead, 1, "all")
    temb = a.get("temb")
    if temb is not None and temb.ndim == 3 and temb.shape[1] > 1:  # per-token timestep (conditioning frames)
        _gather(a, "temb", plan, span.lead, 1)


def _none(a, plan, span):
    return None


def _call_timestep(t):
    """The timestep a call's plans are keyed on: per-token timesteps (B, L) (Wan 2.2 TI2V, LTX
    conditioning frames: 0 on the clean frames) give their largest, the noise level of the frames
    being generated, as ComfyUI's sigma does."""
    if isinstance(t, torch.Tensor) and t.ndim >= 2:
        return t.flatten(1).amax(dim=1)
    return t


def _read_video_latent(a, model):
    """Grid of a (B, C, F, H, W) latent patched by config.patch_size (p_t, p_h, p_w) or
    config.patch_size / patch_size_t."""
    x, cfg = a.get("hidden_states"), model.config
    grid = None
    if isinstance(x, torch.Tensor) and x.ndim == 5:
        p = cfg.patch_size
        pt, ph, pw = tuple(p) if isinstance(p, (list, tuple)) else (getattr(cfg, "patch_size_t", 1) or 1, p, p)
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
    return CallInfo(grid, _n_txt(a), _call_timestep(a.get("timestep")), x)


def _grid_from_coords(coords, n_tokens: int):
    """(grid (frames, h, w), lead) of LTX-Video ``video_coords`` (B, 3, N) (frame, row, column of
    every token; LTXConditionPipeline puts the tokens of conditioning clips before the video): the
    video is the longest tail of frames that repeat the last frame's raster of rows and columns at
    increasing frame coordinates; lead = the tokens before it. (None, 0) when there is no raster."""
    if not isinstance(coords, torch.Tensor) or coords.ndim != 3 or coords.shape[1] != 3 or coords.shape[2] != n_tokens:
        return None, 0
    if not torch.equal(coords[:1].expand_as(coords), coords):  # rows of one layout
        return None, 0
    t, y, x = coords[0]
    last_row = ((t == t[-1]) & (y == y[-1])).flip(0)
    w = int(last_row.cumprod(0).sum())
    plane = int((t == t[-1]).flip(0).cumprod(0).sum())
    if w == 0 or plane % w:
        return None, 0
    h = plane // w
    rows, cols = y[-plane:].reshape(h, w), x[-plane:].reshape(h, w)
    raster = bool((rows == rows[:, :1]).all() and (cols == cols[:1]).all())
    raster = raster and bool((rows[1:, 0] > rows[:-1, 0]).all() and (cols[0, 1:] > cols[0, :-1]).all())
    if not raster:
        return None, 0
    k = n_tokens // plane
    tail = coords[0, :, n_tokens - k * plane :].reshape(3, k, plane)
    same = (tail[1:] == coords[0, 1:, -plane:].unsqueeze(1)).all(dim=2).all(dim=0) & (tail[0] == tail[0, :, :1]).all(dim=1)
    rising = torch.ones(k, dtype=torch.bool, device=coords.device)
    rising[:-1] = tail[0, :-1, 0] < tail[0, 1:, 0]
    frames = int((same & rising).flip(0).cumprod(0).sum())
    return (frames, h, w), n_tokens - frames * plane


def _read_ltx(a, model):
    x, coords = a.get("hidden_states"), a.get("video_coords")
    f, h, w = a.get("num_frames"), a.get("height"), a.get("width")
    grid, lead, reason = None, 0, None
    if coords is not None and isinstance(x, torch.Tensor) and x.ndim == 3:  # rotary positions from the coordinates
        grid, lead = _grid_from_coords(coords, x.shape[1])
        if grid is None:
            reason = "video_coords whose last tokens are no frames x rows x columns raster"
    elif None not in (f, h, w):
        grid = (int(f), int(h), int(w))
    return CallInfo(grid, _n_txt(a), _call_timestep(a.get("timestep")), x, lead, reason)


FAMILIES = {
    "FluxTransformer2DModel": Family(
        "flux",
        (BlockList("transformer_blocks", "hidden_states", False, False, ("attn",)),
         BlockList("single_transformer_blocks", "hidden_states", False, True, ("attn",))),
        True, _read_flux, _rotary_after_text,
    ),
    # Flux.1's ControlNet (InstantX, Union, Shakker-Labs): Flux blocks; each block's output, taken
    # at full length (the hooks unmerge it), becomes a residual of the transformer.
    "FluxControlNetModel": Family(
        "flux",
        (BlockList("transformer_blocks", "hidden_states", False, False, ("attn",)),
         BlockList("single_transformer_blocks", "hidden_states", False, True, ("attn",))),
        True, _read_flux_controlnet, _rotary_after_text, predicts=False,
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

VIDEO_FAMILIES = {
    "WanTransformer3DModel": Family(
        "wan", (BlockList("blocks", "hidden_states", False, False, ("attn1",)),), False, _read_video_latent, _wan_positions,
    ),
    "HunyuanVideoTransformer3DModel": Family(
        "hunyuan-video",
        (BlockList("transformer_blocks", "hidden_states", False, False, ("attn",), out=0),
         BlockList("single_transformer_blocks", "hidden_states", False, False, ("attn",), out=0)),
        False, _read_video_latent, _hunyuan_positions,
    ),
    "LTXVideoTransformer3DModel": Family(
        "ltx-video", (BlockList("transformer_blocks", "hidden_states", False, False, ("attn1",)),), False, _read_ltx, _ltx_positions,
    ),
}
FAMILIES.update(VIDEO_FAMILIES)

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


class CallArgs:
    """A call's arguments by name, keyword-catch-all entries (``**kwargs``) included:
    ``named`` to read and change, ``args_kwargs()`` to call again (each value where it was
    passed; a name that was not passed goes by keyword; positional values past the named
    parameters (``*args``) pass through unchanged). Plain dicts and tuples, no
    ``inspect.BoundArguments``: torch.compile traces this inside the blocks without a graph break."""

    def __init__(self, fn, args, kwargs):
        params = inspect.signature(fn).parameters.values()
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.args, self.kwargs = args, kwargs
        self.index = {name: i for i, name in enumerate(positional[: len(args)])}
        self.named = {name: args[i] for name, i in self.index.items()}
        self.named.update(kwargs)

    def args_kwargs(self):
        args, kwargs = list(self.args), dict(self.kwargs)
        for name, value in self.named.items():
            if name in self.index:
                args[self.index[name]] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs
