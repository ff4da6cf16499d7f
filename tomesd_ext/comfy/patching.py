"""Patch mechanics on a ComfyUI MODEL: clone, drop any earlier tomesd-ext patch, attach ours.

Everything goes through ModelPatcher's own extension points (attn1/attn2 patches, a
DIFFUSION_MODEL or APPLY_MODEL wrapper, ``patches_replace["dit"]`` blocks, the attention override,
object patches, sampler post-CFG functions), on a clone, so the input
MODEL, its other patches (LoRA weights, ControlNet, other nodes' attention patches) and ComfyUI's
caching are left alone, and ComfyUI itself undoes the object patches when another model is
loaded. ComfyUI is imported lazily, so this module imports without it.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from ..core import ImportancePolicy, MergeRuntime, TomePolicy, timestep_key
from ..kernels import check_kernel_setting
from .animatediff import clip_call

log = logging.getLogger("tomesd_ext")
WRAPPER_KEY = "tomesd_ext"
PATCH_NAMES = ("attn1_patch", "attn1_output_patch", "attn2_patch", "attn2_output_patch")
SUPPORTED = "UNet models (SD 1.x, SD 2.x, SDXL and their variants)"


class PatchState:
    """What every callable of one tomesd-ext patch shares: the ``MergeRuntime`` and the slot of
    the block call in progress. ``on_call(x, transformer_options)``: a policy's own per-call step.
    Deep copies (ComfyUI deep-copies ``model_options`` on every ``clone()``) return the same
    object, so all callables of one node keep sharing it."""

    def __init__(self, runtime: MergeRuntime, on_call=None):
        self.runtime = runtime
        self.opts, self.policy = runtime.opts, runtime.policy
        self.slot = runtime.new_slot()
        self.on_call = on_call
        self.clip_said = False  # the AnimateDiff line was logged

    def __deepcopy__(self, memo):
        return self

    @torch.compiler.disable  # Python call state (step key, random draws): outside a compiled graph
    def begin_call(self, x: torch.Tensor, timesteps, sigmas, transformer_options=None) -> None:
        """x: (B, C, H, W) latent of this UNet call; timesteps: what the UNet receives (the key of
        every random draw); sigmas: its noise level (the sampling window); transformer_options:
        the call's (``cond_or_uncond``: the order of its batch chunks; AnimateDiff-Evolved's
        ``ad_params``: the rows are the frames of a clip, which share plans, animatediff.py)."""
        latent_hw = tuple(x.shape[-2:]) if x is not None and x.ndim == 4 else None
        clip = clip_call(x, transformer_options)
        self.runtime.begin_call(latent_hw, timestep_key(timesteps), sigmas, device=getattr(x, "device", None),
                                clip_frames=clip.frames if clip is not None else 1)
        if clip is not None and not self.clip_said:
            self.clip_said = True
            log.info("tomesd-ext: AnimateDiff frames: %d-frame calls of a %d-frame clip, frame_plan=%s "
                     "(said once per patch)", clip.frames, clip.full_length, self.opts.frame_plan)
        self.slot.reset()
        if self.on_call is not None:
            self.on_call(x, transformer_options or {})

    @torch.compiler.disable
    def end_call(self) -> None:
        self.runtime.end_call()
        self.slot.reset()

    def token_map(self, hmap: torch.Tensor, latent_shape) -> Optional[torch.Tensor]:
        """An importance map (B0, H, W) of a step's latent (B0, C, H, W) as this patch's policy
        stores it (a UNet's: as it is; the policy pools it per level); None when the latent is no
        image. The transformer states store the mean map at their token grid."""
        return hmap if len(latent_shape) == 4 else None


def merge_policy(opts):
    """The policy of a transformer patch: importance mode's or ToMe's (opts.mode)."""
    return ImportancePolicy(opts) if opts.mode == "importance" else TomePolicy(opts)


class SharedPatch:
    """Base of our patch callables: holds the shared PatchState; deep copy keeps identity."""

    def __init__(self, state: PatchState):
        self.state = state

    def __deepcopy__(self, memo):
        return self


class DiffusionModelWrapper(SharedPatch):
    """wrapper(executor, x, timesteps, context, y, control, transformer_options, **kw): tells the
    state the latent size, step key and sigma of every UNet call."""

    def __call__(self, executor, x, timesteps=None, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options") or {}
        self.state.begin_call(x, timesteps, options.get("sigmas"), options)
        try:
            return executor(x, timesteps, *args, **kwargs)
        finally:
            self.state.end_call()


class StandIn(torch.nn.Module):
    """Base of the modules a tomesd-ext node installs with ``ModelPatcher.add_object_patch``.

    The original module is kept unregistered in ``inner``; its children and parameters are
    registered here under their own names, so parameter paths (LoRA keys, ``state_dict``,
    low-VRAM casting) stay those of the original. ``strip`` removes every StandIn.
    """

    def __init__(self, inner: torch.nn.Module, state: PatchState):
        super().__init__()
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "state", state)
        for name, child in inner.named_children():
            self.add_module(name, child)
        for name, param in inner.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in inner.named_buffers(recurse=False):
            self.register_buffer(name, buf)

    def __deepcopy__(self, memo):
        return self

    @staticmethod
    def unwrap(module: torch.nn.Module) -> torch.nn.Module:
        """The original module under any stand-ins."""
        while isinstance(module, StandIn):
            module = module.inner
        return module


ATTENTION_OVERRIDE = "optimized_attention_override"


def _wrapper_types():
    """The wrapper types our patches use: DIFFUSION_MODEL (UNets), APPLY_MODEL (transformers)."""
    from comfy.patcher_extension import WrappersMP

    return WrappersMP.DIFFUSION_MODEL, WrappersMP.APPLY_MODEL


def strip(m) -> None:
    """Remove every tomesd-ext patch from the ModelPatcher ``m`` (a clone), keeping the others."""
    patches = m.model_options.get("transformer_options", {}).get("patches", {})
    for name in PATCH_NAMES:
        if name in patches:
            kept = [p for p in patches[name] if not isinstance(p, SharedPatch)]
            if kept:
                patches[name] = kept
            else:
                del patches[name]
    post_cfg = m.model_options.get("sampler_post_cfg_function")
    if post_cfg:
        kept = [fn for fn in post_cfg if not isinstance(fn, SharedPatch)]
        if kept:
            m.model_options["sampler_post_cfg_function"] = kept
        else:
            del m.model_options["sampler_post_cfg_function"]
    for kind in _wrapper_types():
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
    to = m.model_options.get("transformer_options", {})
    dit = to.get("patches_replace", {}).get("dit")
    for key in [k for k, fn in (dit or {}).items() if isinstance(fn, SharedPatch)]:
        del dit[key]
    override = to.get(ATTENTION_OVERRIDE)
    if isinstance(override, SharedPatch):  # ours: restore the override it wrapped, if any
        if getattr(override, "previous", None) is None:
            del to[ATTENTION_OVERRIDE]
        else:
            to[ATTENTION_OVERRIDE] = override.previous
    for key, obj in list(m.object_patches.items()):
        if isinstance(obj, StandIn):
            del m.object_patches[key]


def remove_tome_patch(model):
    """A clone of ``model`` without any tomesd-ext patch (other patches are kept)."""
    m = model.clone()
    strip(m)
    return m


def patched_clone(model, state: PatchState, apply_model_wrapper=None):
    """A clone of ``model`` without earlier tomesd-ext patches, with the wrapper that feeds
    ``state`` every call: the diffusion-model wrapper (UNets), or ``apply_model_wrapper`` as an
    APPLY_MODEL wrapper (transformers). A bad TOMESD_EXT_KERNELS fails here, not at every step."""
    check_kernel_setting()
    m = model.clone()
    strip(m)
    diffusion_model, apply_model = _wrapper_types()
    if apply_model_wrapper is None:
        m.add_wrapper_with_key(diffusion_model, WRAPPER_KEY, DiffusionModelWrapper(state))
    else:
        m.add_wrapper_with_key(apply_model, WRAPPER_KEY, apply_model_wrapper)
    return m


def unsupported_reason(model, what: str = "") -> str:
    """The one console warning of a node whose model has no UNet to patch."""
    inner = type(getattr(getattr(model, "model", None), "diffusion_model", None)).__name__
    return f"tomesd-ext: token merging skipped{what}, cannot patch {inner}: supported are {SUPPORTED}"


def window_error(start_percent: float, end_percent: float) -> Optional[str]:
    """What is wrong with a sampling part [start_percent, end_percent], or None."""
    for name, v in (("start_percent", start_percent), ("end_percent", end_percent)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"{name} must be a number in [0, 1], got {v!r}"
        if not (0.0 <= float(v) <= 1.0):
            return f"{name}={v} is out of range: allowed [0, 1]"
    if start_percent > end_percent:
        return f"start_percent={start_percent} must not exceed end_percent={end_percent}"
    return None


def sigma_progress(sampling, sigma) -> Optional[float]:
    """The fraction of sampling done at noise level ``sigma`` (a number or a tensor whose first
    entry is used): ``percent_to_sigma`` inverted by bisection (it falls as the percentage rises);
    None when sigma is None. The windows of per-block settings read it."""
    if sigma is None:
        return None
    s = float(sigma.flatten()[0].item()) if hasattr(sigma, "flatten") else float(sigma)
    lo, hi = 0.0, 1.0
    for _ in range(24):
        mid = (lo + hi) / 2
        if float(sampling.percent_to_sigma(mid)) > s:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sigma_range(model, start_percent: float, end_percent: float) -> Tuple[float, float]:
    """(sigma_start, sigma_end) of the sampling part [start_percent, end_percent]."""
    error = window_error(start_percent, end_percent)
    if error:
        raise ValueError(error)
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))
