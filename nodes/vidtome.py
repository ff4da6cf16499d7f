"""Video Token Merging (VidToMe) node: MODEL -> MODEL; the video's frames are the latent batch.

Classic ComfyUI node API, like nodes/tome.py (see docs/comfyui.md). Options are validated by
``VidToMeOptions.create`` (the same checks as ``apply_vidtome``); the patch is
``tomesd_ext.comfy.apply_vidtome_patch``, which calls the same core functions as the diffusers
adapter. Nothing here imports ComfyUI at module level.
"""

from __future__ import annotations

from ._common import MODEL_INPUT, WINDOW_INPUTS, ModelPatchNode, range_error, window_error
from ._imports import comfy_adapter, core

VidToMeOptions = core.VidToMeOptions
MAX_DOWNSAMPLE = ["1", "2", "4", "8"]


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
        return {
            "required": {
                "model": MODEL_INPUT,
                "chunk_size": ("INT", {
                    "default": 4, "min": 1, "max": 64,
                    "tooltip": "Frames merged together (VidToMe's chunk). Every step the first chunk gets a random "
                               "length in [1, chunk_size] and the chunks run in random order, so seams move.",
                }),
                "local_ratio": ("FLOAT", {
                    "default": 0.9, "min": 0.0, "max": 0.99, "step": 0.01,
                    "tooltip": "Fraction of the other frames' tokens merged into the chunk's target frame "
                               "(they take the target token's value). 0 = no merging inside a chunk.",
                }),
                "global_ratio": ("FLOAT", {
                    "default": 0.8, "min": 0.0, "max": 0.99, "step": 0.01,
                    "tooltip": "Fraction merged with the token set carried from chunk to chunk within a step "
                               "(consistency across chunks). 0 = no global set.",
                }),
                "max_downsample": (MAX_DOWNSAMPLE, {
                    "default": "2",
                    "tooltip": "Merge in self-attention at levels with this downsample factor or less "
                               "(2: SD1.5's two highest-resolution levels).",
                }),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": 2**62,
                    "tooltip": "Seed of VidToMe's draws (chunk borders and order, target frame, global roles); "
                               "not the noise seed. Same seed -> same result.",
                }),
                "global_rand": ("FLOAT", {
                    "default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Probability that the carried global set is the source side of the global merge "
                               "(else the chunk's tokens are).",
                }),
                "align_batch": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "cond and uncond share one match map (each token's best match over both). "
                               "Needs cond and uncond in one batch, which ComfyUI does when memory allows; "
                               "when it splits them each half is matched on its own.",
                }),
                **WINDOW_INPUTS,
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent=0.0, end_percent=1.0):
        # No **kwargs: ComfyUI would then skip its own min/max check of every input.
        error = range_error(cls, start_percent=start_percent, end_percent=end_percent)
        return error or window_error(start_percent, end_percent) or True

    @staticmethod
    def options(chunk_size, local_ratio, global_ratio, max_downsample, seed, global_rand=0.5, align_batch=True) -> "VidToMeOptions":
        """Validated VidToMeOptions from the widget values (raises OptionError with the limit)."""
        return VidToMeOptions.create(
            chunk_size=int(chunk_size), local_ratio=float(local_ratio), global_ratio=float(global_ratio),
            max_downsample=int(max_downsample), seed=int(seed), global_rand=float(global_rand),
            align_batch=bool(align_batch),
        )

    @staticmethod
    def apply(model, opts, start_percent, end_percent):
        """(patched clone, None) or (model, reason): the adapter call of this node."""
        return comfy_adapter.apply_vidtome_patch(model, opts, start_percent, end_percent)


NODE_CLASS_MAPPINGS = {"TomesdExtVidToMe": TomesdExtVidToMe}
NODE_DISPLAY_NAME_MAPPINGS = {"TomesdExtVidToMe": "Video Token Merging (VidToMe, tomesd-ext)"}
