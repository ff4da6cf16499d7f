"""Apply ToMe to a ComfyUI MODEL: clone, drop any earlier tomesd-ext patch, install ours.

Everything goes through ModelPatcher's own extension points (attn1/attn2 patches, a
DIFFUSION_MODEL wrapper, object patches for ``ff``), on a clone, so the input MODEL, its other
patches (LoRA weights, ControlNet, other nodes' attention patches) and ComfyUI's caching are
left alone, and ComfyUI itself undoes the object patches when another model is loaded.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

from ..core import ToMeOptions
from .geometry import auto_max_downsample, transformer_blocks, unet_of
from .patches import (
    Attn1OutputPatch,
    Attn1Patch,
    Attn2OutputPatch,
    Attn2Patch,
    DiffusionModelWrapper,
    MergedFeedForward,
    StandIn,
    _StatePatch,
)
from .state import ComfyToMeState

WRAPPER_KEY = "tomesd_ext"
PATCH_NAMES = ("attn1_patch", "attn1_output_patch", "attn2_patch", "attn2_output_patch")
SUPPORTED = "UNet models (SD 1.x, SD 2.x, SDXL and their variants)"
log = logging.getLogger("tomesd_ext")


def _diffusion_model_wrapper_type():
    from comfy.patcher_extension import WrappersMP

    return WrappersMP.DIFFUSION_MODEL


def remove_tome_patch(model):
    """A clone of ``model`` without any tomesd-ext patch (other patches are kept)."""
    m = model.clone()
    _strip(m)
    return m


def _strip(m) -> None:
    patches = m.model_options.get("transformer_options", {}).get("patches", {})
    for name in PATCH_NAMES:
        if name in patches:
            kept = [p for p in patches[name] if not isinstance(p, _StatePatch)]
            if kept:
                patches[name] = kept
            else:
                del patches[name]
    post_cfg = m.model_options.get("sampler_post_cfg_function")
    if post_cfg:
        kept = [fn for fn in post_cfg if not isinstance(fn, _StatePatch)]
        if kept:
            m.model_options["sampler_post_cfg_function"] = kept
        else:
            del m.model_options["sampler_post_cfg_function"]
    m.remove_wrappers_with_key(_diffusion_model_wrapper_type(), WRAPPER_KEY)
    for key, obj in list(m.object_patches.items()):
        if isinstance(obj, StandIn):  # ToMe's MergedFeedForward, VidToMe's attention
            del m.object_patches[key]


def unsupported_reason(model, what: str = "") -> str:
    """The one console warning of a node whose model has no UNet to patch."""
    inner = type(getattr(getattr(model, "model", None), "diffusion_model", None)).__name__
    return f"tomesd-ext: token merging skipped{what}, cannot patch {inner}: supported are {SUPPORTED}"


def patched_clone(model, state):
    """A clone of ``model`` without earlier tomesd-ext patches, with the diffusion-model wrapper
    that feeds ``state`` the latent size, step key and sigma of every call."""
    m = model.clone()
    _strip(m)
    m.add_wrapper_with_key(_diffusion_model_wrapper_type(), WRAPPER_KEY, DiffusionModelWrapper(state))
    return m


def window_error(start_percent: float, end_percent: float) -> Optional[str]:
    """What is wrong with a sampling part [start_percent, end_percent], or None."""
    for name, v in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not (0.0 <= float(v) <= 1.0):
            return f"{name}={v} is out of range: allowed [0, 1]"
    if start_percent > end_percent:
        return f"start_percent={start_percent} must not exceed end_percent={end_percent}"
    return None


def sigma_range(model, start_percent: float, end_percent: float) -> Tuple[float, float]:
    """(sigma_start, sigma_end) of the sampling part [start_percent, end_percent]."""
    error = window_error(start_percent, end_percent)
    if error:
        raise ValueError(error)
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))


def apply_tome_patch(
    model, opts: ToMeOptions, start_percent: float = 0.0, end_percent: float = 1.0
) -> Tuple[object, Optional[str]]:
    """Return (patched clone, None), or (``model`` unchanged, reason) when it cannot be patched.

    opts: validated ``ToMeOptions``; a previous tomesd-ext patch on ``model`` is replaced.
    """
    m, _state, reason = install_patch(model, opts, start_percent, end_percent)
    return m, reason


def install_patch(model, opts: ToMeOptions, start_percent: float = 0.0, end_percent: float = 1.0,
                  state_type=ComfyToMeState):
    """(patched clone, its state, None) or (``model``, None, reason): the block patches of every
    merge node; ``state_type(opts, max_downsample, sigma_start, sigma_end)`` holds the policy."""
    unet = unet_of(model)
    if unet is None:
        return model, None, unsupported_reason(model)
    if opts.max_downsample == "auto":
        max_ds = auto_max_downsample(unet)
        if max_ds is None:
            return model, None, f"tomesd-ext: token merging skipped, {type(unet).__name__} has no spatial transformer blocks"
    else:
        max_ds = opts.max_downsample
    sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
    state = state_type(opts, max_ds, sigma_start, sigma_end)

    m = patched_clone(model, state)
    m.set_model_attn1_patch(Attn1Patch(state))  # always: it marks the start of every block call
    if opts.merge_attn:
        m.set_model_attn1_output_patch(Attn1OutputPatch(state))
    if opts.merge_crossattn:
        m.set_model_attn2_patch(Attn2Patch(state))
        m.set_model_attn2_output_patch(Attn2OutputPatch(state))
    if opts.merge_mlp:
        for path, _block in transformer_blocks(unet):
            key = path + ".ff"
            m.add_object_patch(key, MergedFeedForward(StandIn.unwrap(m.get_model_object(key)), state))
    return m, state, None
