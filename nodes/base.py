"""What every tomesd-ext node definition shares: category, MODEL in/out, widgets built from the core's option
tables (``core.TOME_OPTIONS``, ``core.VIDTOME_OPTIONS``: the same defaults, ranges and help text
as ``apply_tome`` / ``apply_vidtome`` and the README), the sampling-window inputs, and how a patch
result is returned (one console warning when the model passed through)."""

from __future__ import annotations

import logging

from .library import comfy_adapter

window_error = comfy_adapter.window_error  # the adapter's own check of a sampling part (start <= end)

CATEGORY = "model_patches/token_merging"
log = logging.getLogger("tomesd_ext")

# Widget bounds where an option's range is open or unbounded: a float in [lo, hi) shows max
# hi - step; an unbounded int (seed, min_tokens) shows this max.
INT_MAX = 2**62
# A node's seed is a fixed widget value (the same seed, the same image), never None. The
# frontend adds a "control after generate" widget (default: randomize) to every INT input named
# seed unless the input says control_after_generate False: a randomised merge seed would change
# the image on every run, and the extra widget shifts the widgets_values of saved workflows.
NODE_SEED_DEFAULT = 0

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


def widget(option, default=None, choices=None):
    """The ComfyUI input spec of a core ``Option`` (its help text is the tooltip).

    default: a node default where the library's is not a widget value (min_tokens None -> 2048).
    choices: the combo entries (strings) of a "choice" option, when a node offers fewer.
    """
    value = option.default if default is None else default
    spec = {"tooltip": option.help}
    if option.kind == "choice":
        entries = [str(c) for c in (choices or option.choices)]
        return (entries, {"default": str(value), **spec})
    if option.kind == "bool":
        return ("BOOLEAN", {"default": value, **spec})
    if option.kind == "seed":
        seed = NODE_SEED_DEFAULT if default is None else default
        return ("INT", {"default": seed, "min": 0, "max": INT_MAX, "control_after_generate": False, **spec})
    if option.kind == "int":
        hi = INT_MAX if option.hi is None else option.hi
        return ("INT", {"default": value, "min": option.lo, "max": hi, **spec})
    hi = round(option.hi - option.step, 10) if option.hi_open else option.hi
    return ("FLOAT", {"default": value, "min": option.lo, "max": hi, "step": option.step, **spec})


def combo_value(value):
    """A combo entry as the option wants it: "auto" stays, "2" -> 2; anything else is passed on
    unchanged for the option check to refuse with its message."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


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
    """Base of our MODEL -> MODEL node definitions: ComfyUI-free, in the shape of a classic node
    (INPUT_TYPES, VALIDATE_INPUTS, FUNCTION ``patch``), declared to ComfyUI by nodes/v3.py.

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


class SimplePatchNode(ModelPatchNode):
    """The simple form of a node beside its full ("advanced") one, as ComfyUI's KSampler stands
    beside KSamplerAdvanced: the inputs of ``ADVANCED`` whose option the core table marks
    ``simple``, and the sampling window, in the advanced node's order; every other input runs at
    the advanced node's default (from the same table). Options, validation of the options and
    the patch are the advanced node's, so both nodes merge alike at the same values.

    A subclass sets ``ADVANCED`` (the full definition) and ``TABLE`` (its core option table).
    """

    ADVANCED = None
    TABLE = None

    @classmethod
    def shown(cls):
        """The names of the inputs this node shows (model first)."""
        full = cls.ADVANCED.INPUT_TYPES()["required"]
        return [name for name in full
                if name == "model" or name in WINDOW_INPUTS or (name in cls.TABLE and cls.TABLE[name].simple)]

    @classmethod
    def hidden_defaults(cls):
        """The advanced node's default widget values of the inputs this node does not show."""
        full, shown = cls.ADVANCED.INPUT_TYPES()["required"], set(cls.shown())
        return {name: spec[1]["default"] for name, spec in full.items() if name not in shown}

    @classmethod
    def INPUT_TYPES(cls):
        full = cls.ADVANCED.INPUT_TYPES()["required"]
        return {"required": {name: full[name] for name in cls.shown()}}

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent=0.0, end_percent=1.0):
        # named inputs only (no **kwargs): ComfyUI range-checks every other input itself
        error = range_error(cls, start_percent=start_percent, end_percent=end_percent)
        return error or window_error(start_percent, end_percent) or True

    @classmethod
    def options(cls, **widgets):
        """The advanced node's options at its defaults, with the shown inputs' values."""
        return cls.ADVANCED.options(**{**cls.hidden_defaults(), **widgets})

    @classmethod
    def apply(cls, model, opts, start_percent, end_percent):
        return cls.ADVANCED.apply(model, opts, start_percent, end_percent)
