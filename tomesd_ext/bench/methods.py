"""The methods the bench compares: one entry per method, a name -> (apply, remove) pair.

To add a method, `register(Method(name, apply, remove, ...))`: `apply(model, ratio, ctx)` patches
the denoiser (a UNet or a diffusion transformer) in place, `remove(model)` restores it exactly.
`ctx` carries the shared settings (seed, the level the peers should use) so every method runs
with the same ones. `models` says which denoisers a method takes ("unet", "dit": image
transformers, "video": video transformers); `supports(model)` gives the reason a particular
denoiser cannot take it (e.g. a transformer without diffusers' cache), or None.
`effective_ratio(model, ratio)` is the ratio the patched model runs, which rows record (a ratio
above a method's maximum is clamped: ours reads its options, tomesd stops at one destination
per window).

Stacks (what users already run, alone and with ours): `fbcache` / `tome+fbcache` (diffusers'
FirstBlockCache on the transformer, `probe` counts the denoiser calls that skipped their tail
blocks), `compile` / `tome+compile` (torch.compile; these `build` their own patched, compiled
copy once and keep it across calls: compiled.py).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

BASELINE = "baseline"


@dataclass(frozen=True)
class MethodContext:
    """Settings shared by every method of a run: the partition seed and the levels to merge
    (max_downsample resolved from "auto" for a UNet, so peers get the same; None for a DiT)."""

    seed: int
    max_downsample: Optional[int]
    compile_backend: str = "inductor"  # torch.compile backend of the compile methods
    cache_threshold: float = 0.05  # FirstBlockCache threshold of fbcache / tome+fbcache
    min_tokens: Optional[int] = None  # ours' auto-skip threshold (bench --min-tokens); None: the library's default


def patched_ratio(model, ratio: float) -> float:
    """The ratio of our patch on `model` (clamped by the option checks), or `ratio` unpatched."""
    from ..diffusers import tome_options

    opts = tome_options(model)
    return ratio if opts is None else opts.ratio


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable  # (unet, ratio, MethodContext) -> None
    remove: Callable  # (unet) -> None
    description: str
    uses_ratio: bool = True  # False: one row per resolution, ratio None
    unavailable: Callable[[], Optional[str]] = lambda: None  # why it cannot run here, or None
    models: tuple = ("unet",)  # the denoisers it takes: "unet", "dit" (image), "video" (video transformers), "animatediff"
    supports: Callable[[object], Optional[str]] = lambda model: None  # why this denoiser cannot take it, or None
    # a context entered around a measured call after apply: yields a dict of row fields it fills
    probe: Optional[Callable[[object], object]] = None
    # (model, ratio, ctx) -> the configuration's own denoiser, built once and kept (compiled.py);
    # apply/remove are then not used
    build: Optional[Callable] = None
    # (patched model, requested ratio) -> the ratio it runs (rows: ratio, and ratio_requested)
    effective_ratio: Callable[[object, float], float] = patched_ratio


METHODS: Dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _noop(*args):
    return None


def _ours(model, ratio, ctx, **options):
    """apply_tome with the run's seed (and --min-tokens when given) and ``options``."""
    from ..diffusers import apply_tome

    if ctx.min_tokens is not None:
        options.setdefault("min_tokens", ctx.min_tokens)
    apply_tome(model, ratio, seed=ctx.seed, **options)


def _tome_apply(unet, ratio, ctx):
    _ours(unet, ratio, ctx)


def _tome_remove(unet):
    from ..diffusers import remove_tome

    remove_tome(unet)


def _importance_apply(unet, ratio, ctx):
    _ours(unet, ratio, ctx, mode="importance")


def _tome_d2_apply(unet, ratio, ctx):
    _ours(unet, ratio, ctx, max_downsample=max(2, ctx.max_downsample * 2))


def _level_apply(unet, ratio, ctx):
    _ours(unet, ratio, ctx, reuse="level")


def _level_k2_apply(unet, ratio, ctx):
    _ours(unet, ratio, ctx, reuse="level", reuse_steps=2)


@contextlib.contextmanager
def kernel_mode(mode: str):
    """Run the block with TOMESD_EXT_KERNELS=mode ("auto", "cuda" or "torch"), then restore it."""
    enter_kernel_mode(mode)
    try:
        yield
    finally:
        leave_kernel_mode()


_saved_modes: List[Optional[str]] = []


def enter_kernel_mode(mode: str) -> None:
    from ..kernels import dispatch

    _saved_modes.append(os.environ.get(dispatch.ENV))
    os.environ[dispatch.ENV] = mode
    dispatch.reset()


def leave_kernel_mode() -> None:
    from ..kernels import dispatch

    previous = _saved_modes.pop()
    if previous is None:
        os.environ.pop(dispatch.ENV, None)
    else:
        os.environ[dispatch.ENV] = previous
    dispatch.reset()


def _kernel_method(mode: str) -> tuple:
    """(apply, remove) of ours with the kernel backend forced to `mode` while patched."""

    def apply(unet, ratio, ctx):
        enter_kernel_mode(mode)
        _tome_apply(unet, ratio, ctx)

    def remove(unet):
        _tome_remove(unet)
        leave_kernel_mode()

    return apply, remove


def _dit_mode_method(mode: str, **options) -> Callable:
    def apply(model, ratio, ctx):
        _ours(model, ratio, ctx, dit_mode=mode, **options)

    return apply


def _unet_mode_method(mode: str) -> Callable:
    def apply(model, ratio, ctx):
        from ..diffusers import apply_tome

        apply_tome(model, ratio, seed=ctx.seed, unet_mode=mode)

    return apply


def _cuda_missing():
    import torch

    return None if torch.cuda.is_available() else "CUDA is not available here (the CUDA kernels need --device cuda)"


def _tomesd_missing():
    try:
        import tomesd  # noqa: F401
    except ImportError:
        return "tomesd is not installed (pip install tomesd==0.1.3)"
    return None


TOMESD_WINDOW = (2, 2)  # sx, sy of the tomesd peer


def _tomesd_apply(unet, ratio, ctx):
    import tomesd

    sx, sy = TOMESD_WINDOW
    tomesd.apply_patch(unet, ratio=ratio, max_downsample=ctx.max_downsample, sx=sx, sy=sy, use_rand=True)


def _tomesd_ratio(unet, ratio: float) -> float:
    """tomesd merges at most its source tokens, all but one destination per sx x sy window: a
    larger ratio runs as 1 - 1/(sx*sy) (on grids the windows tile; tomesd does not warn)."""
    sx, sy = TOMESD_WINDOW
    return min(ratio, 1.0 - 1.0 / (sx * sy))


def _tomesd_remove(unet):
    import tomesd

    tomesd.remove_patch(unet)


def _qonly_apply(unet, ratio, ctx):
    from ..diffusers import apply_query_merge

    apply_query_merge(unet, ratio, seed=ctx.seed, max_downsample=1)


def _todo_apply(unet, ratio, ctx):
    from ..diffusers import apply_todo

    apply_todo(unet, factor=2, max_downsample=ctx.max_downsample)


def _todo_remove(unet):
    from ..diffusers import remove_todo

    remove_todo(unet)


register(Method(BASELINE, _noop, _noop, "the unmerged model", uses_ratio=False, models=("unet", "dit", "video", "animatediff")))
register(Method("tome", _tome_apply, _tome_remove, "ours: tomesd_ext.apply_tome (defaults, seeded; DiTs: dit_mode='auto'; "
                "video transformers: st=2, spatio-temporal windows; AnimateDiff: one plan per clip, "
                "frame_plan='shared')", models=("unet", "dit", "video", "animatediff")))


def _per_frame_apply(unet, ratio, ctx):
    _ours(unet, ratio, ctx, frame_plan="per-frame")


register(Method("tome-per-frame", _per_frame_apply, _tome_remove, "ours on an AnimateDiff UNet with "
                "frame_plan='per-frame': every frame matched on its own tokens", models=("animatediff",)))
_DIT_MODES = {
    "block": "image tokens merged through the whole block (attention and MLP), unmerged after",
    "attn": "image tokens merged around attention only",
    "kv": "keys/values of image tokens merged, queries kept (no unmerge)",
}
for _mode, _what in _DIT_MODES.items():
    if _mode == "block":
        continue
    register(Method(f"tome-{_mode}", _dit_mode_method(_mode), _tome_remove, f"ours on a DiT, dit_mode='{_mode}': {_what}",
                    models=("dit", "video")))


def _block_apply(model, ratio, ctx):
    from ..diffusers import apply_tome

    apply_tome(model, ratio, seed=ctx.seed, dit_mode="block", unet_mode="block")


register(Method("tome-block", _block_apply, _tome_remove, "ours in block mode: a transformer block's (image) tokens "
                "merged once, the whole block run on them, its update unmerged (DiTs: dit_mode='block'; UNets and "
                "AnimateDiff: unet_mode='block')", models=("unet", "dit", "video", "animatediff")))
register(Method("tome-ops", _unet_mode_method("ops"), _tome_remove, "ours on a UNet with unet_mode='ops' (ToMe-SD: "
                "merged around self-attention, copied back after it)", models=("unet", "animatediff")))
register(Method("tome-spatial", _dit_mode_method("auto", st=1, frame_reach=0), _tome_remove,
                "ours on a video transformer, spatial-only: st=1, frame_reach=0 (per-frame windows, every token "
                "merges within its own frame: image ToMe on each frame)", models=("video",)))
register(Method("tome-st1", _dit_mode_method("auto", st=1), _tome_remove,
                "ours on a video transformer with st=1: per-frame windows (one destination per sy x sx window of "
                "a frame), matching across all frames", models=("video",)))
register(
    Method(
        "importance",
        _importance_apply,
        _tome_remove,
        "ours: apply_tome(mode='importance'), destinations from the CFG-difference map of the "
        "previous step (docs/importance.md; acts from the 2nd step of --steps N with an even --batch)",
    )
)
register(
    Method(
        "tome-d2",
        _tome_d2_apply,
        _tome_remove,
        "ours with the next level merged too (max_downsample 2 on SD1.x/2.x and AnimateDiff SD 1.5, 4 on SDXL; "
        "that level's grid is under the default min_tokens at 512 px: pass --min-tokens 0 to merge it)",
        models=("unet", "animatediff"),
    )
)
register(Method("tome-level", _level_apply, _tome_remove, "ours with one merge plan per level and step (reuse='level')"))
register(
    Method(
        "tome-level-k2",
        _level_k2_apply,
        _tome_remove,
        "ours with one plan per level kept for 2 steps (reuse='level', reuse_steps=2; reuses from the 2nd step of --steps N)",
    )
)
_ANY_DENOISER = ("unet", "dit", "video", "animatediff")
register(Method("tome-torch", *_kernel_method("torch"), "ours with the torch kernels forced (TOMESD_EXT_KERNELS=torch)",
                models=_ANY_DENOISER))
register(
    Method(
        "tome-cuda",
        *_kernel_method("cuda"),
        "ours with the CUDA kernels required (TOMESD_EXT_KERNELS=cuda; CPU tensors run the torch path)",
        unavailable=_cuda_missing,
        models=_ANY_DENOISER,
    )
)


def _reuse_steps_method(k: int) -> Callable:
    def apply(model, ratio, ctx):
        _ours(model, ratio, ctx, reuse_steps=k)

    return apply


for _k in (2, 4):
    register(Method(f"tome-k{_k}", _reuse_steps_method(_k), _tome_remove,
                    f"ours with every block's plan kept for {_k} steps (reuse_steps={_k}; reuses from the 2nd step of "
                    "--steps N)", models=_ANY_DENOISER))
register(
    Method(
        "tomesd",
        _tomesd_apply,
        _tomesd_remove,
        "tomesd 0.1.3 apply_patch, same ratio/max_downsample/sx/sy/use_rand",
        unavailable=_tomesd_missing,
        effective_ratio=_tomesd_ratio,
    )
)
register(
    Method(
        "comfy-qonly",
        _qonly_apply,
        _tome_remove,
        "ComfyUI built-in style: queries merged, K/V full, d=1 (our engine)",
    )
)
register(
    Method(
        "todo",
        _todo_apply,
        _todo_remove,
        "ToDo: K/V downsampled 2x per axis (nearest), queries whole (our engine)",
        uses_ratio=False,
    )
)


# --- stacks: what users already run, alone and with ours ---------------------------------------



def _no_cache(model) -> Optional[str]:
    if hasattr(model, "enable_cache"):
        return None
    return f"{type(model).__name__} has no diffusers cache (no enable_cache; UNets and SD3/PixArt/Z-Image transformers)"


def _fbcache_apply(model, ratio, ctx):
    from diffusers.hooks import FirstBlockCacheConfig

    model.enable_cache(FirstBlockCacheConfig(threshold=ctx.cache_threshold))


def _fbcache_remove(model):
    model.disable_cache()


def _tome_fbcache_apply(model, ratio, ctx):
    _tome_apply(model, ratio, ctx)
    _fbcache_apply(model, ratio, ctx)


def _tome_fbcache_remove(model):
    _fbcache_remove(model)
    _tome_remove(model)


def tail_block(model):
    """The last transformer block, the one FirstBlockCache skips with the others after the first:
    the last block of the model's last top-level block list (diffusers' order)."""
    import torch

    try:
        from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS as names
    except ImportError:  # a diffusers without it: every top-level block list
        names = None
    lists = [m for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList) and len(m) and (names is None or n in names)]
    return lists[-1][-1] if lists else None


@contextlib.contextmanager
def skipped_tail_calls(model):
    """Count the denoiser calls whose tail block was skipped (called, but none of its children
    ran: the cache returned its input plus the cached residual). Yields a dict that holds
    cache_hits and denoiser_calls on exit."""
    fields = {}
    tail = tail_block(model)
    if tail is None:
        yield fields
        return
    state = {"ran": False, "calls": 0, "skipped": 0}

    def enter(module, args):
        state["ran"] = False

    def child(module, args):
        state["ran"] = True

    def leave(module, args, output):
        state["calls"] += 1
        state["skipped"] += not state["ran"]

    handles = [tail.register_forward_pre_hook(enter), tail.register_forward_hook(leave)]
    handles += [c.register_forward_pre_hook(child) for c in tail.children()]
    try:
        yield fields
    finally:
        for h in handles:
            h.remove()
        fields.update(cache_hits=state["skipped"], denoiser_calls=state["calls"])


def _compiled_build(patch: Optional[Callable]) -> Callable:
    """build(): a deep copy of the (unpatched) denoiser, patched by `patch`, compiled in place
    (Module.compile with ctx.compile_backend: the module keeps its type and attributes, its calls
    go through dynamo)."""

    def build(model, ratio, ctx):
        own = copy.deepcopy(model)
        if patch is not None:
            patch(own, ratio, ctx)
        own.compile(backend=ctx.compile_backend)
        return own

    return build


def _taylorseer_apply(model, ratio, ctx):
    from diffusers.hooks import TaylorSeerCacheConfig

    model.enable_cache(TaylorSeerCacheConfig())


def _tome_taylorseer_apply(model, ratio, ctx):
    _tome_apply(model, ratio, ctx)
    _taylorseer_apply(model, ratio, ctx)


ALL_MODELS = ("unet", "dit", "video")
register(Method("fbcache", _fbcache_apply, _fbcache_remove,
                "diffusers FirstBlockCache (model.enable_cache(FirstBlockCacheConfig(threshold=--cache-threshold))); "
                "rows count the denoiser calls that skipped their tail blocks (cache_hits)",
                uses_ratio=False, models=("dit", "video"), supports=_no_cache, probe=skipped_tail_calls))
register(Method("tome+fbcache", _tome_fbcache_apply, _tome_fbcache_remove,
                "ours (as tome), then diffusers FirstBlockCache (as fbcache) on the merged model",
                models=("dit", "video"), supports=_no_cache, probe=skipped_tail_calls))
register(Method("compile", _noop, _noop, "torch.compile of the denoiser (Module.compile on its own copy, "
                "compiled once per resolution; compile_seconds, graph_breaks, recompiles)",
                uses_ratio=False, models=ALL_MODELS, build=_compiled_build(None)))
register(Method("tome+compile", _noop, _noop, "ours (as tome) applied to the denoiser's own copy, then torch.compile "
                "(as compile)", models=ALL_MODELS, build=_compiled_build(_tome_apply)))
register(Method("taylorseer", _taylorseer_apply, _fbcache_remove,
                "diffusers TaylorSeer cache with its defaults (TaylorSeerCacheConfig(): every step for the first 3, "
                "then a full step every 5, attention outputs predicted by a first-order Taylor series in between)",
                uses_ratio=False, models=("dit", "video"), supports=_no_cache))
register(Method("tome+taylorseer", _tome_taylorseer_apply, _tome_fbcache_remove,
                "ours (as tome), then the TaylorSeer cache (as taylorseer) on the merged model",
                models=("dit", "video"), supports=_no_cache))
