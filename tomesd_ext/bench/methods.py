"""The methods the bench compares: one entry per method, a name -> (apply, remove) pair.

To add a method, `register(Method(name, apply, remove, ...))`: `apply(model, ratio, ctx)` patches
the denoiser (a UNet or a diffusion transformer) in place, `remove(model)` restores it exactly.
`ctx` carries the shared settings (seed, the level the peers should use) so every method runs
with the same ones. `models` says which denoisers a method takes ("unet", "dit": image
transformers, "video": video transformers).
"""

from __future__ import annotations

import contextlib
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


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable  # (unet, ratio, MethodContext) -> None
    remove: Callable  # (unet) -> None
    description: str
    uses_ratio: bool = True  # False: one row per resolution, ratio None
    unavailable: Callable[[], Optional[str]] = lambda: None  # why it cannot run here, or None
    models: tuple = ("unet",)  # the denoisers it takes: "unet", "dit" (image), "video" (video transformers)


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


def _tome_apply(unet, ratio, ctx):
    from ..diffusers import apply_tome

    apply_tome(unet, ratio, seed=ctx.seed)


def _tome_remove(unet):
    from ..diffusers import remove_tome

    remove_tome(unet)


def _importance_apply(unet, ratio, ctx):
    from ..diffusers import apply_tome

    apply_tome(unet, ratio, seed=ctx.seed, mode="importance")


def _tome_d2_apply(unet, ratio, ctx):
    from ..diffusers import apply_tome

    apply_tome(unet, ratio, seed=ctx.seed, max_downsample=max(2, ctx.max_downsample * 2))


def _level_apply(unet, ratio, ctx):
    from ..diffusers import apply_tome

    apply_tome(unet, ratio, seed=ctx.seed, reuse="level")


def _level_k2_apply(unet, ratio, ctx):
    from ..diffusers import apply_tome

    apply_tome(unet, ratio, seed=ctx.seed, reuse="level", reuse_steps=2)


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
        from ..diffusers import apply_tome

        apply_tome(model, ratio, seed=ctx.seed, dit_mode=mode, **options)

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


def _tomesd_apply(unet, ratio, ctx):
    import tomesd

    tomesd.apply_patch(unet, ratio=ratio, max_downsample=ctx.max_downsample, sx=2, sy=2, use_rand=True)


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


register(Method(BASELINE, _noop, _noop, "the unmerged model", uses_ratio=False, models=("unet", "dit", "video")))
register(Method("tome", _tome_apply, _tome_remove, "ours: tomesd_ext.apply_tome (defaults, seeded; DiTs: dit_mode='auto'; "
                "video transformers: st=2, spatio-temporal windows)", models=("unet", "dit", "video")))
_DIT_MODES = {
    "block": "image tokens merged through the whole block (attention and MLP), unmerged after",
    "attn": "image tokens merged around attention only",
    "kv": "keys/values of image tokens merged, queries kept (no unmerge)",
}
for _mode, _what in _DIT_MODES.items():
    register(Method(f"tome-{_mode}", _dit_mode_method(_mode), _tome_remove, f"ours on a DiT, dit_mode='{_mode}': {_what}",
                    models=("dit", "video")))
register(Method("tome-spatial", _dit_mode_method("auto", st=1), _tome_remove,
                "ours on a video transformer with st=1: per-frame windows (one destination per sy x sx window of "
                "a frame; matching still across all frames)", models=("video",)))
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
        "ours with the next level merged too (max_downsample 2 on SD1.x/2.x, 4 on SDXL)",
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
register(Method("tome-torch", *_kernel_method("torch"), "ours with the torch kernels forced (TOMESD_EXT_KERNELS=torch)"))
register(
    Method(
        "tome-cuda",
        *_kernel_method("cuda"),
        "ours with the CUDA kernels required (TOMESD_EXT_KERNELS=cuda; CPU tensors run the torch path)",
        unavailable=_cuda_missing,
    )
)
register(
    Method(
        "tomesd",
        _tomesd_apply,
        _tomesd_remove,
        "tomesd 0.1.3 apply_patch, same ratio/max_downsample/sx/sy/use_rand",
        unavailable=_tomesd_missing,
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
