"""ratio="auto" on diffusers denoisers: the error-budget search of core/schedule.py, run at the
first call of each input shape, and schedules loaded from files.

``AutoRatio`` is a forward pre-hook of the denoiser that runs before the patch's call pre-hook.
At a call whose key (model fingerprint, family, input shape and dtype, options but the seed) has
no choice yet, it calls the denoiser again on the call's own arguments, without gradients: once
with nothing merged (the reference) and for the search's candidates (core.schedule.search: at
most 1 + G + 1 + 5 = 12 forwards, G = 5 search groups), leaves the chosen block ratios on the runtime and
returns; the call itself then runs merged with them. The choice is kept per key in memory (and
as JSON in ``schedule_cache`` when given), so a later call or run with the same key costs no
extra forward. One log line per search or cache hit gives the choice, its error and cost.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.options import OptionError
from ..core.schedule import AutoChooser, Schedule, model_fingerprint


def first_tensor(output):
    """The denoiser's prediction: a tensor, the first entry of a tuple or of a diffusers output
    (a list of per-sample tensors: all of them, flattened)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "to_tuple"):
        output = output.to_tuple() if hasattr(output, "to_tuple") else tuple(output.values())
    first = output[0]
    if isinstance(first, (list, tuple)):  # one tensor per sample (Z-Image)
        return torch.cat([t.reshape(-1) for t in first])
    return first


def call_shape(args, kwargs) -> Optional[tuple]:
    """The shape of a denoiser call's latent input (UNets: sample; transformers: hidden_states;
    Z-Image: the list x, one shape per entry), None when it has none."""
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states", kwargs.get("x")))
    if isinstance(sample, torch.Tensor):
        return tuple(sample.shape), str(sample.dtype)
    if isinstance(sample, (list, tuple)) and sample and all(isinstance(s, torch.Tensor) for s in sample):
        return tuple(tuple(s.shape) for s in sample), str(sample[0].dtype)
    return None


class AutoRatio:
    """Forward pre-hook of a denoiser patched with ratio="auto" (module docstring); ``chooser``:
    the patch's ``core.schedule.AutoChooser``."""

    def __init__(self, patch, family: str, cache_folder: Optional[str] = None):
        self.chooser = AutoChooser(patch.runtime, family, cache_folder)

    @property
    def extra_forwards(self) -> int:
        return self.chooser.extra_forwards

    @property
    def last(self):
        return self.chooser.last

    @torch.compiler.disable  # Python control flow and extra forwards: outside a compiled graph
    def __call__(self, module, args, kwargs):
        if self.chooser.searching:
            return None
        shape = call_shape(args, kwargs)
        if shape is None:
            return None

        def forward():
            with torch.no_grad():
                return first_tensor(module(*args, **kwargs))

        self.chooser.choose(module, shape, forward)
        return None


def load_schedule(schedule, model) -> Schedule:
    """A Schedule from a path or a Schedule, refused (OptionError) when it was measured on
    another model than ``model``."""
    if isinstance(schedule, (str, bytes)) or hasattr(schedule, "__fspath__"):
        import os

        loaded = Schedule.load(os.fsdecode(schedule))
        where = f"schedule={os.fsdecode(schedule)!r}"
    elif isinstance(schedule, Schedule):
        loaded, where = schedule, "schedule"
    else:
        raise OptionError(f"schedule must be a path to a schedule JSON file or a Schedule, got {schedule!r}")
    loaded.check_model(model_fingerprint(model), where)
    return loaded
