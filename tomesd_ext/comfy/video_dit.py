"""ToMe on ComfyUI's video transformers (Wan 2.1 / 2.2, HunyuanVideo, LTX-Video), on a clone only.

The same extension points as the image transformers (dit.py): ``WrappersMP.APPLY_MODEL`` starts
the runtime's call with the video token grid (frames, h, w) read from the latent (B, C, T, H, W)
and the family's patch size; ``patches_replace["dit"]`` block replacements merge the image span
(block mode) or offer the block's plan to ``KeysValuesAttention`` (kv mode). The algorithm is
core/dit.py (``merge_span``, ``gather_span``, ``unmerge_update``); the window depth ``st`` and
the seed reach the partition through the runtime (core/tome.py).

``keep_first_frame``: the first latent frame's tokens (``lead``) sit before the merged span and
are never merged; the span is the remaining (frames - 1) x h x w grid.

Where each v0.8.0 family keeps its tokens (comfy/ldm):

- Wan (``wan.model.WanModel`` and its VACE, camera, S2V, HuMo, Animate subclasses): blocks
  ("double_block", i) over ``blocks``; ``img`` is the image tokens alone (text enters by cross
  attention, ``txt`` untouched); ``pe``: (1, L, 1, D/2, 2, 2), sequence dim 1; ``vec``: (B, 1, 6,
  C), or per frame / per token (B, T', 6, C) (Wan 2.2 TI2V), expanded to the tokens and gathered.
- HunyuanVideo (``hunyuan_video.model.HunyuanVideo``): double blocks take ``img`` beside ``txt``;
  single blocks take ``img = [image, text]``; ``pe``: (B, 1, L, ...) over [image, text], dim 2;
  ``attention_mask``: None or (1, 1, L) over [image, text]. Image-to-video token replace
  (``modulation_dims``) merges only with keep_first_frame (the replaced frame is the first).
- LTX-Video (``lightricks.model.LTXVModel``, not LTX-2's audio-video model): blocks
  ("double_block", i) over ``transformer_blocks``; ``img`` the image tokens; ``pe``: (cos, sin[,
  split]) with cos (B, L, D) or (B, H, L, D/2); ``vec``: (B, 1 or L, 6C), per token gathered.

A call whose image sequence is not exactly the grid (reference latents, keyframe tokens, an
extra time concat) is not merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ..core import MergeRuntime, ToMeOptions, shared_token_map, timestep_key
from ..core.dit import dit_settings, gather_span, merge_span, span_plan, unmerge_update
from .dit import KeysValuesAttention, install_blocks
from .patching import PatchState, SharedPatch, merge_policy, sigma_range


@dataclass(frozen=True)
class VideoFamily:
    """key: the core family key (DIT_DEFAULTS); blocks: (diffusion model) -> ``patches_replace
    ["dit"]`` keys in execution order; patch: (diffusion model) -> (pt, ph, pw); padded: the model
    pads the latent up to the patch size (else it floors); text_after: block kinds whose ``img``
    is [image, text]; positions: (args, inner, plan, start, state) -> None after putting the
    gathered positional inputs into ``inner``, or the reason the call cannot merge; time_scale:
    (diffusion model) -> the factor from ``model_sampling.timestep`` to the timestep the diffusers
    model of the family takes, so that both adapters key the partition on the same number."""

    label: str
    key: str
    blocks: Callable
    patch: Callable
    padded: bool
    text_after: Tuple[str, ...]
    positions: Callable
    time_scale: Callable = lambda dm: 1.0


def _kinds(*lists):
    def blocks(dm):
        return [(kind, i) for kind, name in lists for i in range(len(getattr(dm, name)))]

    return blocks


def _wan_positions(args, inner, plan, start, state):
    x = args["img"]
    inner["pe"] = gather_span(args["pe"], plan, start, 1)
    vec = args.get("vec")
    if isinstance(vec, torch.Tensor) and vec.ndim == 4 and vec.shape[1] > 1:  # per frame or per token
        from comfy.ldm.wan.model import repeat_e  # ComfyUI's own expansion to the tokens

        inner["vec"] = gather_span(repeat_e(vec, x), plan, start, 1)
    return None


def _hunyuan_positions(args, inner, plan, start, state):
    dims = args.get("modulation_dims_img", args.get("modulation_dims"))
    if dims is not None and start != dims[0][1]:
        return "image-to-video token replace (set keep_first_frame)"
    pe = args.get("pe")
    if isinstance(pe, torch.Tensor):
        inner["pe"] = gather_span(pe, plan, start, 2)
    mask = args.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        inner["attention_mask"] = gather_span(mask, plan, start, mask.ndim - 1)
    return None


def _ltx_positions(args, inner, plan, start, state):
    pe = args.get("pe")
    if isinstance(pe, (tuple, list)):
        inner["pe"] = tuple(
            gather_span(t, plan, start, 2 if t.ndim == 4 else 1) if isinstance(t, torch.Tensor) else t for t in pe
        )
    vec = args.get("vec")
    if isinstance(vec, torch.Tensor) and vec.ndim == 3 and vec.shape[1] > 1:  # per-token timestep
        inner["vec"] = gather_span(vec, plan, start, 1)
    return None


def _triple(p) -> Tuple[int, int, int]:
    p = tuple(int(v) for v in (p if isinstance(p, (tuple, list)) else (1, p, p)))
    return (1,) + p if len(p) == 2 else p


WAN = VideoFamily("Wan", "wan", _kinds(("double_block", "blocks")), lambda dm: _triple(dm.patch_size), True, (),
                  _wan_positions)
HUNYUAN = VideoFamily("HunyuanVideo", "hunyuan-video", _kinds(("double_block", "double_blocks"), ("single_block", "single_blocks")),
                      lambda dm: _triple(dm.patch_size), False, ("single_block",), _hunyuan_positions)
LTXV = VideoFamily("LTX-Video", "ltx-video", _kinds(("double_block", "transformer_blocks")),
                   lambda dm: _triple(dm.patchifier.patch_size), False, (), _ltx_positions,
                   lambda dm: float(dm.timestep_scale_multiplier))  # ComfyUI's 0-1 timestep, diffusers' 0-1000

SUPPORTED_VIDEO_DITS = "Wan 2.1 / 2.2, HunyuanVideo, LTX-Video"


def video_family_of(diffusion_model) -> Optional[VideoFamily]:
    """The video family of a ComfyUI diffusion model (by class, subclasses included), or None."""
    try:
        from comfy.ldm.hunyuan_video.model import HunyuanVideo
        from comfy.ldm.lightricks.model import LTXVModel
        from comfy.ldm.wan.model import WanModel
    except ImportError:
        return None
    if isinstance(diffusion_model, WanModel):
        return WAN
    if isinstance(diffusion_model, HunyuanVideo):
        return HUNYUAN
    if isinstance(diffusion_model, LTXVModel) and type(diffusion_model).__name__ != "LTXAVModel":
        return LTXV
    return None


def video_grid(latent_shape, patch: Tuple[int, int, int], padded: bool) -> Optional[Tuple[int, ...]]:
    """(frames, h, w) token grid of a latent (B, C, T, H, W) (or (h, w) of an image (B, C, H, W))."""
    if len(latent_shape) not in (4, 5):
        return None
    dims = latent_shape[2:]
    sizes = patch[-len(dims):]
    return tuple((-(-d // p) if padded else d // p) for d, p in zip(dims, sizes))


class VideoState(PatchState):
    """PatchState of a video DiT patch: the family, per call the text length and ``lead`` (the
    first frame's tokens held out of the merged span), and (kv mode) the running block's plan."""

    def __init__(self, runtime: MergeRuntime, family: VideoFamily, patch: Tuple[int, int, int], keep_first: bool,
                 time_scale: float = 1.0):
        super().__init__(runtime)
        self.family, self.patch, self.keep_first, self.time_scale = family, patch, keep_first, time_scale
        self.n_txt = self.lead = 0
        self.kv = None  # (plan, start of the image span) while a kv-mode block runs
        self.said = set()

    @torch.compiler.disable  # Python call state (step key, random draws): outside a compiled graph
    def begin_dit_call(self, latent, timestep, sigma, progress=None) -> None:
        grid = video_grid(tuple(latent.shape), self.patch, self.family.padded) if isinstance(latent, torch.Tensor) else None
        self.n_txt = self.lead = 0
        self.kv = None
        if grid is not None and len(grid) == 3:
            if self.keep_first:
                self.lead, grid = grid[1] * grid[2], (grid[0] - 1,) + grid[1:]
            grid = grid[1:] if grid[0] == 1 else (None if grid[0] < 1 else grid)
        self.runtime.begin_call(grid, timestep_key(timestep * self.time_scale), sigma, device=getattr(latent, "device", None),
                                progress=progress)
        if self.on_call is not None:  # importance mode: the map of the previous step
            self.on_call(latent, {})

    def token_map(self, hmap: torch.Tensor, latent_shape) -> Optional[torch.Tensor]:
        """The mean map of a step (B0, [F,] H, W) at the token grid this patch merges (PatchState):
        (1, frames, h, w) less a kept first frame, (1, h, w) for one frame; None when none is left.
        A family that pads the latent up to its patch size gets the map padded alike (edge values)."""
        grid = video_grid(tuple(latent_shape), self.patch, self.family.padded)
        if grid is None or hmap.ndim != len(grid) + 1:
            return None
        try:
            if len(grid) == 2:  # an image latent: partial edge cells average their real pixels
                return shared_token_map(hmap, grid)
            if grid[0] - int(self.keep_first) < 1:
                return None
            if self.family.padded:
                pad = (0, (-hmap.shape[-1]) % self.patch[2], 0, (-hmap.shape[-2]) % self.patch[1])
                hmap = torch.nn.functional.pad(hmap, pad, mode="replicate") if any(pad) else hmap
            return shared_token_map(hmap, grid, self.keep_first)
        except ValueError:
            return None

    def end_call(self) -> None:
        super().end_call()
        self.kv = None

    def say_once(self, reason: str) -> None:
        if reason not in self.said:
            self.said.add(reason)
            import logging

            logging.getLogger("tomesd_ext").warning(
                "tomesd-ext: %s calls with %s are not merged (said once per patch)", self.family.label, reason)


class _VideoBlock(SharedPatch):
    """A ``patches_replace["dit"]`` entry: block_fn(args, {"original_block": fn}) -> dict."""

    def __init__(self, state: VideoState, slot, kind: str):
        super().__init__(state)
        self.slot, self.kind = slot, kind

    def plan(self, args):
        """(plan or None, start of the image span in args["img"], the block's inputs with their
        positional entries gathered at the plan's anchors)."""
        state, rt = self.state, self.state.runtime
        self.slot.reset()
        txt = args.get("txt")
        if state.family.text_after and isinstance(txt, torch.Tensor):  # a later block's [image, text]
            state.n_txt = txt.shape[1]
        x = args.get("img")
        if not rt.active or not isinstance(x, torch.Tensor) or x.ndim != 3:
            return None, 0, args
        n, start = rt.grid_tokens, state.lead
        after = state.n_txt if self.kind in state.family.text_after else 0
        if x.shape[1] != start + n + after:
            state.say_once(f"{x.shape[1] - start - n - after:+d} tokens beside the latent's grid")
            return None, 0, args
        plan = span_plan(self.slot, x, start)
        if plan is None:
            return None, 0, args
        inner = dict(args)
        reason = state.family.positions(args, inner, plan, start, state)
        if reason is not None:
            state.say_once(reason)
            return None, 0, args
        return plan, start, inner


class VideoBlockMerge(_VideoBlock):
    """Block mode: the original block on merged image tokens, its update unmerged."""

    def __call__(self, args, extra):
        original = extra["original_block"]
        plan, start, inner = self.plan(args)
        if plan is None:
            return original(args)
        x = args["img"]
        merged = merge_span(x, plan, start)
        inner["img"] = merged.clone()  # a block may add to its input in place
        out = dict(original(inner))
        out["img"] = unmerge_update(x, merged, out["img"], plan, start)
        return out


class VideoKeysValuesPlan(_VideoBlock):
    """kv mode: the block's plan offered to ``KeysValuesAttention`` while the original block runs
    (its inputs unchanged: queries keep every token)."""

    def __call__(self, args, extra):
        plan, start, _inner = self.plan(args)
        self.state.kv = None if plan is None else (plan, start)
        try:
            return extra["original_block"](args)
        finally:
            self.state.kv = None


class FirstAttentionOnly(KeysValuesAttention):
    """kv mode: the block's plan serves its first attention call only, the self (joint) attention
    in all three families; the cross attention after it is left alone even when the text happens
    to have as many tokens as the video (Wan's umT5 context is always 512)."""

    def __call__(self, func, *args, **kwargs):
        try:
            return super().__call__(func, *args, **kwargs)
        finally:
            self.state.kv = None


def apply_video_patch(model, dm, family: VideoFamily, opts: ToMeOptions, start_percent: float = 0.0,
                      end_percent: float = 1.0):
    """(the patched clone of ``model`` whose diffusion model ``dm`` is of ``family``, its VideoState).

    opts: validated ToMeOptions (ratio, seed, min_tokens, dit_mode, skip_ends, st,
    keep_first_frame apply; the policy is ``merge_policy(opts)``). A previous tomesd-ext patch on
    ``model`` is replaced."""
    mode, skip = dit_settings(family.key, opts.dit_mode, opts.skip_ends)
    sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
    runtime = MergeRuntime(merge_policy(opts), 1, sigma_start, sigma_end)
    state = VideoState(runtime, family, family.patch(dm), opts.keep_first_frame, family.time_scale(dm))
    blocks = (VideoBlockMerge, VideoKeysValuesPlan, FirstAttentionOnly)
    return install_blocks(model, state, mode, family.blocks(dm), skip, blocks), state
