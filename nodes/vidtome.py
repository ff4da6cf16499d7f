"""Video Token Merging (VidToMe) node: MODEL -> MODEL; the video's frames are the latent batch.

A definition like nodes/tome.py, declared to ComfyUI by nodes/v3.py (docs/comfyui.md). Options are validated by
``VidToMeOptions.create`` (the same checks as ``apply_vidtome``); the patch is
``tomesd_ext.comfy.apply_vidtome_patch``, which calls the same core functions as the diffusers
adapter. Nothing here imports ComfyUI at module level.
"""

from __future__ import annotations

from .base import MODEL_INPUT, WINDOW_INPUTS, ModelPatchNode, combo_value, range_error, widget, window_error
from .library import comfy_adapter, core

VidToMeOptions = core.VidToMeOptions
OPTIONS = core.VIDTOME_OPTIONS
WIDGETS = ("chunk_size", "local_ratio", "global_ratio", "max_downsample", "seed", "global_rand", "align_batch")


class TomesdExtVidToMe(ModelPatchNode):
    """VidToMe temporal token merging (Li, Ma, Yang & Yang, CVPR 2024) across the frames of a batch."""

    DESCRIPTION = (
        "Video Token Merging (VidToMe) for UNet models (SD 1.x, SD 2.x, SDXL) in video-to-video: "
        "the frames of the latent batch are split into random chunks; inside each chunk the "
        "self-attention tokens of all frames are merged into one target frame and with a token "
        "set carried across chunks, so the frames share features (more consistent video) and "
        "attention runs on fewer tokens. Put it between the model loader (and LoRA) and the "
        "sampler. The latest tomesd-ext node on a model replaces an earlier one (ToMe or VidToMe); "
        "another model type passes through unchanged with a warning."
    )
    OUTPUT_TOOLTIPS = ("The model with VidToMe merging (a patched clone; the input is unchanged).",)

    @classmethod
    def INPUT_TYPES(cls):
        widgets = {name: widget(OPTIONS[name]) for name in WIDGETS}
        return {"required": {"model": MODEL_INPUT, **widgets, **WINDOW_INPUTS}}

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent=0.0, end_percent=1.0):
        # No **kwargs: ComfyUI would then skip its own min/max check of every input.
        error = range_error(cls, start_percent=start_percent, end_percent=end_percent)
        return error or window_error(start_percent, end_percent) or True

    @staticmethod
    def options(chunk_size, local_ratio, global_ratio, max_downsample, seed, global_rand=0.5, align_batch=True) -> "VidToMeOptions":
        """Validated VidToMeOptions from the widget values (raises OptionError with the limit)."""
        return VidToMeOptions.create(
            chunk_size=chunk_size, local_ratio=local_ratio, global_ratio=global_ratio,
            max_downsample=combo_value(max_downsample), seed=seed, global_rand=global_rand, align_batch=align_batch,
        )

    @staticmethod
    def apply(model, opts, start_percent, end_percent):
        """(patched clone, None) or (model, reason): the adapter call of this node."""
        return comfy_adapter.apply_vidtome_patch(model, opts, start_percent, end_percent)


NODE_DEFINITIONS = {"TomesdExtVidToMe": TomesdExtVidToMe}
DISPLAY_NAMES = {"TomesdExtVidToMe": "Video Token Merging (VidToMe, tomesd-ext)"}
