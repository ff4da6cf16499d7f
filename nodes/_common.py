"""What every tomesd-ext node shares: category, MODEL in/out, the sampling-window inputs and
their check, and how a patch result is returned (one console warning when it passed through)."""

from __future__ import annotations

import logging

CATEGORY = "model_patches/token_merging"
log = logging.getLogger("tomesd_ext")

MODEL_INPUT = ("MODEL", {"tooltip": "The diffusion model to patch (a UNet: SD 1.x, SD 2.x, SDXL)."})
WINDOW_INPUTS = {
    "start_percent": ("FLOAT", {
        "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
        "tooltip": "Sampling progress at which merging starts (0 = first step).",
    }),
    "end_percent": ("FLOAT", {
        "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
        "tooltip": "Sampling progress at which merging stops (1 = last step).",
    }),
}


def window_error(start_percent, end_percent):
    """The VALIDATE_INPUTS message for a start after the end, else None."""
    if start_percent > end_percent:
        return f"start_percent={start_percent} must not exceed end_percent={end_percent}"
    return None


class ModelPatchNode:
    """Base of our MODEL -> MODEL nodes (classic API; FUNCTION ``patch``)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "patch"

    @staticmethod
    def finish(patched, reason):
        """The node's result tuple; ``reason`` (why the model passed through) goes to the console."""
        if reason:
            log.warning(reason)
        return (patched,)
