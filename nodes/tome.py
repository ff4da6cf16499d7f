"""Token Merging (ToMe) node: MODEL -> MODEL, Q/K/V merged through the shared tomesd_ext core.

The node's definition; nodes/v3.py declares it to ComfyUI (V3 node API, see docs/comfyui.md).
Nothing here imports ComfyUI, so the schema and the option validation are testable without it.
"""

from __future__ import annotations

from .base import WINDOW_INPUTS, ModelPatchNode, SimplePatchNode, combo_value, range_error, widget, window_error
from .library import comfy_adapter, core

ToMeOptions = core.ToMeOptions
OptionError = core.OptionError
OPTIONS = core.TOME_OPTIONS
WIDGETS = ("ratio", "max_downsample", "sx", "sy", "use_rand", "seed", "merge_attn", "merge_crossattn", "merge_mlp",
           "min_tokens")
# Transformer inputs, after the sampling window: saved workflows list widget values in input
# order, so inputs added later go last. skip_ends / frame_reach -1 stand for the option's None
# (family default / any frame).
SKIP_ENDS_AUTO = -1
FRAME_REACH_ANY = -1
MAX_ERROR_OFF = 0.0  # the max_error widget's "None": a fixed ratio
COMFY_DIT_MODES = ("auto", "block", "kv")  # "attn" needs diffusers' attention modules (docs/comfyui.md)
DIT_INPUTS = {
    "dit_mode": widget(OPTIONS["dit_mode"], choices=COMFY_DIT_MODES),
    "skip_ends": ("INT", {"default": SKIP_ENDS_AUTO, "min": SKIP_ENDS_AUTO, "max": OPTIONS["skip_ends"].hi,
                          "tooltip": OPTIONS["skip_ends"].help.replace("None =", "-1 =")}),
    # video transformers (Wan, HunyuanVideo, LTX-Video), after the transformer inputs
    "st": widget(OPTIONS["st"]),
    "keep_first_frame": widget(OPTIONS["keep_first_frame"]),
    "frame_reach": ("INT", {"default": FRAME_REACH_ANY, "min": FRAME_REACH_ANY, "max": OPTIONS["frame_reach"].hi,
                            "tooltip": OPTIONS["frame_reach"].help.replace("None =", "-1 =")}),
    # ratio="auto" (Flux, SD3, Qwen-Image): 0 = off, the ratio widget applies
    "max_error": widget(OPTIONS["max_error"], default=MAX_ERROR_OFF),
    "unet_mode": widget(OPTIONS["unet_mode"]),  # UNets, added last
}


# the ToMe nodes take transformers too (the shared MODEL_INPUT names the UNets the other nodes take)
TOME_MODEL_INPUT = ("MODEL", {"tooltip": "The diffusion model to patch: a UNet (SD 1.x, SD 2.x, SDXL) or a "
                                         "supported transformer (Flux, SD3/SD3.5, Qwen-Image, PixArt, Lumina2, Wan, "
                                         "HunyuanVideo, LTX-Video)."})


def tome_widgets(names=WIDGETS) -> dict:
    """The widget inputs of the named ToMe options, in order (min_tokens shows its default)."""
    return {
        name: widget(OPTIONS[name], default=core.options.MIN_TOKENS_DEFAULT if name == "min_tokens" else None)
        for name in names
    }


def window_inputs_error(cls, start_percent, end_percent, sx, sy):
    """The message for a bad sampling window or destination window of node ``cls``, else None."""
    error = range_error(cls, start_percent=start_percent, end_percent=end_percent, sx=sx, sy=sy)
    error = error or window_error(start_percent, end_percent)
    if error:
        return error
    if sx * sy < 2:
        return f"sx*sy must be >= 2 (one destination per window), got sx={sx}, sy={sy}"
    return None


class TomesdExtTokenMerging(ModelPatchNode):
    """Token Merging for Stable Diffusion (Bolya & Hoffman 2023) with Q, K and V merged: the full
    node, every option of the table that applies in ComfyUI (shown as "Token Merging (ToMe,
    Advanced)"; its id predates the simple node and stays, so saved workflows keep loading)."""

    DESCRIPTION = (
        "Token Merging (ToMe) for UNet models (SD 1.x, SD 2.x, SDXL): merges similar tokens before "
        "self-attention (queries, keys and values) and copies the result back after it, so "
        "sampling is faster at a small cost in detail. On the transformers Flux.1, Flux.2, SD3/SD3.5, "
        "Qwen-Image, PixArt, Lumina2/Z-Image and the video transformers Wan 2.1/2.2, HunyuanVideo and LTX-Video (st: window depth in "
        "latent frames; keep_first_frame: an image-to-video frame stays unmerged; frame_reach: how many latent frames away a token may merge, -1 = any) it merges the image tokens of each block (dit_mode block: the whole block "
        "runs on fewer tokens and its update is copied back; kv: keys and values only); text tokens "
        "are never merged, and max_downsample and merge_* apply to UNets only (unet_mode block: each "
        "UNet transformer block runs whole on merged tokens, merge_* ignored). max_error > 0 (Flux, SD3, Qwen-Image): "
        "the ratios of the blocks (the first, three groups of the middle ones, the last) are chosen at the first step, "
        "the cheapest whose output error stays within it (at most 12 extra model calls once per latent size). Put it between the "
        "model loader (and LoRA) and the sampler. Another model type passes through unchanged with "
        "a warning. A second ToMe node on the same model replaces this one. The simple node "
        "\"Token Merging (ToMe)\" shows only ratio and the sampling window and merges exactly like "
        "this one at its defaults."
    )
    OUTPUT_TOOLTIPS = ("The model with token merging (a patched clone; the input is unchanged).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": TOME_MODEL_INPUT, **tome_widgets(), **WINDOW_INPUTS, **DIT_INPUTS}}

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent=0.0, end_percent=1.0, sx=2, sy=2, st=2, frame_reach=FRAME_REACH_ANY):
        # No **kwargs: ComfyUI skips its own min/max check for every input a VALIDATE_INPUTS
        # receives (all of them with **kwargs), so the inputs named here are range-checked here.
        error = window_inputs_error(cls, start_percent, end_percent, sx, sy)
        error = error or range_error(cls, st=st, frame_reach=frame_reach)
        if error:
            return error
        if frame_reach != FRAME_REACH_ANY:
            return core.options.frame_reach_error(frame_reach, st, unset=str(FRAME_REACH_ANY)) or True
        return True

    @staticmethod
    def options(ratio, max_downsample, sx, sy, use_rand, seed, merge_attn, merge_crossattn, merge_mlp,
                min_tokens=None, dit_mode="auto", skip_ends=SKIP_ENDS_AUTO, st=2, keep_first_frame=False,
                frame_reach=FRAME_REACH_ANY, max_error=MAX_ERROR_OFF, unet_mode="auto") -> "ToMeOptions":
        """Validated ToMeOptions from the widget values (raises OptionError with the limit)."""
        # values go to the option check as they are: a wrong type is an OptionError naming the input
        auto = max_error != MAX_ERROR_OFF
        return ToMeOptions.create(
            ratio="auto" if auto else ratio, max_error=max_error if auto else None, max_downsample=combo_value(max_downsample), sx=sx, sy=sy, use_rand=use_rand,
            seed=seed, merge_attn=merge_attn, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp,
            min_tokens=min_tokens, dit_mode=dit_mode, skip_ends=None if skip_ends == SKIP_ENDS_AUTO else skip_ends,
            st=st, keep_first_frame=keep_first_frame, frame_reach=None if frame_reach == FRAME_REACH_ANY else frame_reach,
            unet_mode=unet_mode,
        )

    @staticmethod
    def apply(model, opts, start_percent, end_percent):
        """(patched clone, None) or (model, reason): the adapter call of this node."""
        return comfy_adapter.apply_tome_patch(model, opts, start_percent, end_percent)


class TomesdExtTokenMergingSimple(SimplePatchNode):
    """The ToMe node as most users need it: ratio and the sampling window (the options the core
    table marks simple); everything else at the full node's defaults, which are the family's
    measured ones on transformers (dit_mode auto, skip_ends auto, st 2)."""

    ADVANCED = TomesdExtTokenMerging
    TABLE = OPTIONS
    DESCRIPTION = (
        "Token Merging (ToMe): merges similar image tokens inside the model so sampling is faster, "
        "at a small cost in detail. Works on SD 1.x/2.x, SDXL, Flux.1/Flux.2, SD3/SD3.5, Qwen-Image, "
        "PixArt, Lumina2/Z-Image and the video models Wan 2.1/2.2, HunyuanVideo and LTX-Video, each with "
        "its tested defaults; text tokens are never merged. ratio: how many tokens are merged away "
        "(0 = the model unchanged); start/end_percent: the part of sampling that merges. Put it "
        "between the model loader (and LoRA) and the sampler. Every other setting (window, levels, "
        "seed, transformer and video settings) is on \"Token Merging (ToMe, Advanced)\"."
    )
    OUTPUT_TOOLTIPS = TomesdExtTokenMerging.OUTPUT_TOOLTIPS


# the simple node first: the node menu lists it before the advanced one
NODE_DEFINITIONS = {"TomesdExtTokenMergingSimple": TomesdExtTokenMergingSimple,
                    "TomesdExtTokenMerging": TomesdExtTokenMerging}
DISPLAY_NAMES = {"TomesdExtTokenMergingSimple": "Token Merging (ToMe)",
                 "TomesdExtTokenMerging": "Token Merging (ToMe, Advanced)"}
