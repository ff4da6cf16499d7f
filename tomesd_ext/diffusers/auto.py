"""ratio="auto" on diffusers denoisers: the error-budget search of core/schedule.py, run at the
first call of each input shape, and schedules loaded from files.

``AutoRatio`` is a forward pre-hook of the denoiser that runs before the patch's call pre-hook.
At a call whose key (model fingerprint, family, input shape and dtype, options but the seed) has
no choice yet, it calls the denoiser again on the call's own arguments, without gradients: once
with nothing merged (the reference) and for the search's candidates (core.schedule.search: at
most 1 + 2G + 3 forwards, G = 3 block groups), leaves the chosen block ratios on the runtime and
returns; the call itself then runs merged with them. The choice is kept per key in memory (and
as JSON in ``schedule_cache`` when given), so a later call or run with the same key costs no
extra forward. One log line per search or cache hit gives the choice, its error and cost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields
from typing import Optional

import torch

from ..core.options import OptionError
from ..core.schedule import Schedule, ScheduleCache, model_fingerprint, search_runtime

log = logging.getLogger("tomesd_ext")


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


def options_key(opts) -> tuple:
    """The options that change what the search measures (all but the seed)."""
    return tuple((f.name, getattr(opts, f.name)) for f in fields(opts) if f.name != "seed")


class AutoRatio:
    """Forward pre-hook of a denoiser patched with ratio="auto" (module docstring)."""

    def __init__(self, patch, family: str, cache_folder: Optional[str] = None):
        self.patch, self.family = patch, family
        self.cache = ScheduleCache(cache_folder)
        self.searching = False
        self.fingerprint: Optional[str] = None
        self.chosen = {}  # key -> Schedule
        self.extra_forwards = 0  # forwards the searches of this patch spent (references included)
        self.last: Optional[Schedule] = None  # the schedule of the latest call

    @torch.compiler.disable  # Python control flow and extra forwards: outside a compiled graph
    def __call__(self, module, args, kwargs):
        if self.searching:
            return None
        shape = call_shape(args, kwargs)
        if shape is None:
            return None
        if self.fingerprint is None:
            self.fingerprint = model_fingerprint(module)
        key = (self.fingerprint, self.family, *shape, options_key(self.patch.opts))
        schedule = self.chosen.get(key)
        if schedule is None:
            schedule = self.cache.get(key)
            if schedule is not None:
                log.warning("tomesd-ext: ratio='auto' reuses the cached choice for this model and input %s: block "
                            "ratios %s (error %.4g), no extra forward", shape[0],
                            _ratios(schedule), schedule.info.get("error", float("nan")))
            else:
                schedule = self._search(module, args, kwargs, shape[0])
                self.cache.put(key, schedule)
            self.chosen[key] = schedule
        self.patch.runtime.settings = schedule.settings
        self.last = schedule
        return None

    def _search(self, module, args, kwargs, shape) -> Schedule:
        rt, opts = self.patch.runtime, self.patch.opts
        spent = 0

        def forward():
            nonlocal spent
            spent += 1
            with torch.no_grad():
                return first_tensor(module(*args, **kwargs))

        start = time.perf_counter()
        self.searching = True
        try:
            result = search_runtime(rt, forward, opts.max_error)
        finally:
            self.searching = False
        self.extra_forwards += spent
        seconds = time.perf_counter() - start
        if result is None:
            raise OptionError(f"ratio='auto': {type(module).__name__} has no block that merges at input "
                              f"{shape} (grid below min_tokens?)")
        info = {
            "max_error": opts.max_error, "error": result.error, "cost": result.cost / result.full_cost,
            "extra_forwards": spent, "search_seconds": round(seconds, 3), "family": self.family,
            "input": list(shape), "points": [[list(r), e, c / result.full_cost] for r, e, c in result.points],
        }
        if not any(result.ratios):
            log.warning("tomesd-ext: ratio='auto': no candidate kept the error within max_error=%.4g (the smallest "
                        "measured was %.4g), so this input is not merged; raise max_error to merge",
                        opts.max_error, min(e for r, e, _c in result.points if any(r)))
        log.warning(
            "tomesd-ext: ratio='auto' (max_error=%.4g) measured %d forwards in %.1f s on this call's input %s and "
            "chose block ratios %s: error %.4g, merged-operator cost %.3f of unmerged (said once per model and input)",
            opts.max_error, spent, seconds, shape, tuple(round(r, 4) for r in result.ratios),
            result.error, result.cost / result.full_cost,
        )
        return Schedule(rt.settings, self.fingerprint, info)


def _ratios(schedule: Schedule) -> tuple:
    return tuple(round(s.ratio, 4) for s in schedule.settings)


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
