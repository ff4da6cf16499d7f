"""What every tomesd-ext node shares: category, MODEL in/out, the sampling-window inputs and
their check, and how a patch result is returned (one console warning when it passed through)."""

from __future__ import annotations

import logging

from ._imports import comfy_adapter

window_error = comfy_adapter.window_error  # the adapter's own check of a sampling part (start <= end)

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


def range_error(cls, **values):
    """The VALIDATE_INPUTS message for a value outside its INPUT_TYPES min/max, else None.

    A VALIDATE_INPUTS must name its inputs (no **kwargs): ComfyUI skips its own min/max check
    for every input VALIDATE_INPUTS receives, so those are checked here.
    """
    spec = cls.INPUT_TYPES()["required"]
    for name, value in values.items():
        lo, hi = spec[name][1]["min"], spec[name][1]["max"]
        if not lo <= value <= hi:
            return f"{name}={value} is out of range: allowed [{lo}, {hi}]"
    return None


class ModelPatchNode:
    """Base of our MODEL -> MODEL nodes (classic API; FUNCTION ``patch``).

    A subclass defines ``options(**widgets)`` (validated options from the widget values) and
    ``apply(model, opts, start_percent, end_percent) -> (MODEL, reason or None)``.
    """

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "patch"

    def patch(self, model, start_percent=0.0, end_percent=1.0, **widgets):
        """FUNCTION: the widget values (INPUT_TYPES names) -> options -> patched clone; a reason
        for passing the model through unchanged goes to the console once."""
        opts = self.options(**widgets)
        patched, reason = self.apply(model, opts, start_percent, end_percent)
        if reason:
            log.warning(reason)
        return (patched,)
