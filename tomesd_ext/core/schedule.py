"""Per-block merge settings (a schedule), and the error-budget search that chooses them.

Block groups. The blocks of a patch that may merge (UNets: the transformer blocks at levels up to
``max_downsample``; transformers: the blocks left after ``skip_ends``), in execution order, are
split into G = len(settings) consecutive groups of near-equal size: block i of n is in group
``i * G // n``. One ``BlockSetting`` per group: a ratio and a sampling window [start, end]
(fractions of the sampling run done, as ComfyUI's start/end percent): outside its window the
group merges nothing. ``MergeRuntime`` reads the ratio of each block call (``block_ratio``).

The error budget (``ratio="auto"``, ``max_error``). ``search`` chooses one ratio per group:

1. the reference: one forward with nothing merged (the caller's);
2. probes: for each group g alone, a forward at ratio maximum / 2 and one at the maximum
   (2G forwards); each group's error is fitted as a_g * r ** p_g through its two points;
3. verification: the predicted error of a setting is the root of the sum of its groups' squared
   errors (independent errors; a plain sum over-predicts uniform settings about twofold on the
   sharpened PixArt-Σ and SD 1.5 architectures) times a correction k (1 at first, or measured /
   predicted of a point the caller measured already); the cheapest setting on the grid of ratios {0, 1/6, ..., 1} x
   maximum whose prediction is within the budget is measured, k becomes measured / predicted,
   and this repeats (at most ``verify`` forwards) until the next pick is no cheaper than the
   best setting measured within the budget.

The choice is the cheapest *measured* setting whose error is within the budget (the probes
count; the reference, nothing merged, error 0, is the fallback), so the budget is never exceeded
on the input that was measured. Forwards: at most 1 + 2G + verify (G = 3, verify = 5: 12).
Points measured already (``known``: e.g. a uniform ratio the caller ran) join the candidates.
Deterministic: the grid, the fits and the ties (cheaper, then lower error, then the ratios in
order) depend on the measured errors only. "Cheapest" is ``block_cost``: the multiply-adds of a
block's merged operators at its merged token count (measured time is not deterministic).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .options import OptionError

log = logging.getLogger("tomesd_ext")

SCHEDULE_FORMAT = "tomesd-ext-schedule/1"
AUTO_GROUPS = 3  # block groups the budget search sets independently
AUTO_VERIFY = 5  # verification forwards of the search, after the probes
GRID_STEPS = 6  # ratios searched: maximum * k / GRID_STEPS, k = 0..GRID_STEPS


@dataclass(frozen=True)
class BlockSetting:
    """The merging of one block group: ratio, and the part of sampling [start, end] it merges in."""

    ratio: float
    start: float = 0.0
    end: float = 1.0

    def at(self, progress: Optional[float]) -> float:
        """The ratio at sampling progress (fraction done; None: unknown, the window is not applied)."""
        if progress is None or self.start <= progress <= self.end:
            return self.ratio
        return 0.0

    def as_dict(self) -> dict:
        return {"ratio": self.ratio, "start": self.start, "end": self.end}


def block_settings(value, maximum: float, name: str = "block_ratios") -> Tuple[BlockSetting, ...]:
    """Validate per-group settings: a non-empty sequence of ratios, ``{"ratio", "start", "end"}``
    dicts or BlockSettings. Ratios in [0, maximum]; 0 <= start <= end <= 1."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Sequence) or not value:
        raise OptionError(f"{name} must be a non-empty list of ratios or {{'ratio', 'start', 'end'}} dicts, got {value!r}")
    if len(value) > 64:
        raise OptionError(f"{name} has {len(value)} groups: allowed 1 to 64")
    out = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if isinstance(item, BlockSetting):
            item = item.as_dict()
        if isinstance(item, dict):
            unknown = set(item) - {"ratio", "start", "end"}
            if unknown or "ratio" not in item:
                raise OptionError(f"{where}={item!r}: needs 'ratio' and allows 'start', 'end' only")
            ratio, start, end = item["ratio"], item.get("start", 0.0), item.get("end", 1.0)
        else:
            ratio, start, end = item, 0.0, 1.0
        for part, v, hi in (("ratio", ratio, maximum), ("start", start, 1.0), ("end", end, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= hi:
                raise OptionError(f"{where} {part}={v!r} is out of range: allowed [0, {hi:.4g}]"
                                  + (" (the ratio maximum of sx, sy)" if part == "ratio" else ""))
        if start > end:
            raise OptionError(f"{where}: start={start} must not exceed end={end}")
        out.append(BlockSetting(float(ratio), float(start), float(end)))
    return tuple(out)


def group_of(block: int, n_blocks: int, groups: int) -> int:
    """The group of block ``block`` of ``n_blocks`` split into ``groups`` consecutive groups."""
    return min(block * groups // max(n_blocks, 1), groups - 1)


def block_cost(n_tokens: int, channels: int, ratio: float, kind: str) -> float:
    """Multiply-adds of a block's merged operators with ratio of its n_tokens merged away.

    kind: "block" (projections 4C^2 and MLP 8C^2 per token, attention 2 n^2 C), "attn" (projections
    and attention only), "kv" (queries keep every token: attention 2 N n C), "attn+mlp" (a UNet
    with merge_mlp). The operators that are never merged are the same for every setting: left out."""
    n = n_tokens - math.floor(ratio * n_tokens)
    c = float(channels)
    if kind == "kv":
        return 2.0 * n_tokens * n * c
    linear = {"block": 12.0, "attn": 4.0, "attn+mlp": 12.0}[kind]
    return linear * n * c * c + 2.0 * n * n * c


@dataclass
class SearchResult:
    """The outcome of ``search``: the chosen ratios, their measured error and cost, every measured
    point (ratios, error, cost), and the forwards spent (the reference included)."""

    ratios: Tuple[float, ...]
    error: float
    cost: float
    full_cost: float  # cost with nothing merged
    points: List[Tuple[Tuple[float, ...], float, float]]
    forwards: int


def search(measure: Callable[[Tuple[float, ...]], float], cost: Callable[[Tuple[float, ...]], float],
           groups: int, maximum: float, max_error: float, verify: int = AUTO_VERIFY,
           known: Optional[Dict[Tuple[float, ...], float]] = None) -> SearchResult:
    """The budget search of the module docstring. measure(ratios) -> relative error of the output
    with those group ratios (against the reference the caller measured: 1 forward); cost(ratios);
    known: errors the caller measured already (not measured again, not counted as forwards)."""
    zero = (0.0,) * groups
    points = {zero: 0.0, **(known or {})}
    order = [zero]

    def run(ratios):
        if ratios not in points:
            points[ratios] = float(measure(ratios))
            order.append(ratios)
        return points[ratios]

    half = maximum / 2
    fits = []
    for g in range(groups):
        lo = run(tuple(half if i == g else 0.0 for i in range(groups)))
        hi = run(tuple(maximum if i == g else 0.0 for i in range(groups)))
        p = math.log(hi / lo) / math.log(2.0) if lo > 0 and hi > 0 else 2.0
        p = min(max(p, 0.5), 4.0)
        fits.append((hi / maximum**p if maximum > 0 else 0.0, p))

    def predicted(ratios):  # groups' errors add like independent noise (root of the sum of squares)
        return math.sqrt(sum((a * r**p) ** 2 for (a, p), r in zip(fits, ratios) if r > 0))

    levels = [maximum * k / GRID_STEPS for k in range(GRID_STEPS + 1)]
    grid = sorted(itertools.product(levels, repeat=groups), key=lambda s: (cost(s), predicted(s), s))

    def best_measured():
        ok = [(cost(s), e, s) for s, e in points.items() if e <= max_error]
        return min(ok)

    known_ratios = [known[s] / predicted(s) for s in (known or {}) if predicted(s) > 0 and known[s] > 0]
    k = known_ratios[-1] if known_ratios else 1.0
    for _ in range(verify):
        best_cost = best_measured()[0]
        pick = next((s for s in grid if s not in points and k * predicted(s) <= max_error), None)
        if pick is None or cost(pick) >= best_cost:
            break
        error = run(pick)
        guess = predicted(pick)
        if guess > 0 and error > 0:
            k = error / guess
    c, e, s = best_measured()
    listed = [(r, points[r], cost(r)) for r in order]
    return SearchResult(s, e, c, cost(zero), listed, len(order))  # forwards: the reference and `order`


@dataclass(frozen=True)
class Schedule:
    """Per-group settings for one model, with the fingerprint of the model they were chosen on
    (None: any model) and what was measured (``info``: free-form, written to the file)."""

    settings: Tuple[BlockSetting, ...]
    fingerprint: Optional[str] = None
    info: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        return {"format": SCHEDULE_FORMAT, "fingerprint": self.fingerprint,
                "settings": [s.as_dict() for s in self.settings], "info": self.info}

    @classmethod
    def from_dict(cls, d: dict, where: str = "schedule") -> "Schedule":
        if not isinstance(d, dict) or d.get("format") != SCHEDULE_FORMAT:
            raise OptionError(f"{where} is not a tomesd-ext schedule (format {SCHEDULE_FORMAT!r} expected)")
        settings = block_settings(d.get("settings"), 1.0, f"{where} settings")
        return cls(settings, d.get("fingerprint"), dict(d.get("info") or {}))

    def save(self, path: str) -> str:
        """Write the schedule as JSON (atomically: a failed write leaves no partial file)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "Schedule":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except OSError as e:
            raise OptionError(f"schedule={path!r} cannot be read: {e.strerror or e}") from None
        except ValueError as e:
            raise OptionError(f"schedule={path!r} is not JSON: {e}") from None
        return cls.from_dict(d, f"schedule={path!r}")

    def check_model(self, fingerprint: str, where: str = "schedule") -> None:
        """Refuse a schedule measured on another model (its fingerprint differs)."""
        if self.fingerprint is not None and self.fingerprint != fingerprint:
            raise OptionError(
                f"{where} was calibrated on another model (fingerprint {self.fingerprint}, this model has "
                f"{fingerprint}): its errors do not hold here; calibrate this model (tomesd-ext calibrate) or "
                "use ratio='auto'"
            )


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's parameter names, shapes, dtypes and first values: the same for
    the same weights, different for another architecture or another set of weights (one transfer
    of 8 values per tensor; cheap next to a forward)."""
    h = hashlib.sha256()
    heads = []
    for name, p in model.state_dict().items():
        if not isinstance(p, torch.Tensor):
            continue
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        if p.numel() and p.dtype.is_floating_point and p.device.type != "meta":
            heads.append(p.detach().reshape(-1)[:8].float())
    if heads:
        values = torch.cat([v.to(heads[0].device) for v in heads]).cpu()
        h.update(values.numpy().tobytes())
    return h.hexdigest()[:16]


class ScheduleCache:
    """Chosen schedules by key: in memory for the process, and as JSON files in ``folder`` when given."""

    memory: Dict[str, Schedule] = {}

    def __init__(self, folder: Optional[str] = None):
        self.folder = folder

    @staticmethod
    def name(key) -> str:
        return hashlib.sha256(repr(key).encode()).hexdigest()[:20]

    def get(self, key) -> Optional[Schedule]:
        name = self.name(key)
        found = self.memory.get(name)
        if found is None and self.folder is not None:
            path = os.path.join(self.folder, name + ".json")
            if os.path.exists(path):
                found = Schedule.load(path)
                self.memory[name] = found
        return found

    def put(self, key, schedule: Schedule) -> None:
        name = self.name(key)
        self.memory[name] = schedule
        if self.folder is not None:
            os.makedirs(self.folder, exist_ok=True)
            schedule.save(os.path.join(self.folder, name + ".json"))


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| in float64 (0 when both are 0)."""
    a, b = output.double(), reference.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def settings_of(ratios: Sequence[float]) -> Tuple[BlockSetting, ...]:
    """Whole-run settings (no window) of per-group ratios."""
    return tuple(BlockSetting(float(r)) for r in ratios)


def runtime_cost(runtime, ratios: Sequence[float]) -> float:
    """``block_cost`` summed over the blocks the runtime saw (``block_shapes``), each at its
    group's ratio; the runtime's ``cost_kind`` names the merged operators."""
    kind = getattr(runtime, "cost_kind", "attn")
    n, g = runtime.n_blocks, len(ratios)
    return sum(block_cost(tokens, channels, ratios[group_of(b, n, g)], kind)
               for b, (tokens, channels) in sorted(runtime.block_shapes.items()))


def search_runtime(runtime, forward: Callable[[], torch.Tensor], max_error: float,
                   groups: int = AUTO_GROUPS, verify: int = AUTO_VERIFY) -> Optional[SearchResult]:
    """The budget search on one denoiser call: ``forward()`` runs the call again (the adapter
    calls the model on the call's own input) and returns its output; the runtime's settings are
    set before each forward. Leaves the chosen settings on the runtime; None (and nothing merged)
    when the model has no block to merge."""
    runtime.settings = settings_of((0.0,) * max(groups, 1))
    runtime.record_shapes = True
    try:
        reference = forward()  # nothing merged; fills block_shapes
    finally:
        runtime.record_shapes = False
    groups = min(groups, runtime.n_blocks)
    if groups == 0 or not runtime.block_shapes:
        return None

    def measure(ratios):
        runtime.settings = settings_of(ratios)
        return relative_error(forward(), reference)

    result = search(measure, lambda r: runtime_cost(runtime, r), groups, runtime.opts.ratio, max_error, verify)
    runtime.settings = settings_of(result.ratios)
    return result


def options_key(opts) -> tuple:
    """The options that change what the search measures (all but the seed)."""
    return tuple((f.name, getattr(opts, f.name)) for f in fields(opts) if f.name != "seed")


class AutoChooser:
    """The ratio="auto" state of one patch: the schedule chosen per call key, from the patch's
    memory, the ``ScheduleCache`` or a search (``search_runtime``) on the call's own input.

    An adapter calls ``choose(model, shape, forward)`` before a denoiser call begins: shape, a
    hashable description of the call's input (shape and dtype); forward(), the call run again
    (its prediction). The key adds the model's fingerprint, the family and the options but the
    seed. The chosen settings are left on the runtime; ``searching`` is True while the search's
    own forwards run (the adapter lets them through)."""

    def __init__(self, runtime, family: str, cache_folder: Optional[str] = None):
        self.runtime, self.family = runtime, family
        self.cache = ScheduleCache(cache_folder)
        self.searching = False
        self.fingerprint: Optional[str] = None
        self.chosen = {}  # key -> Schedule
        self.extra_forwards = 0  # forwards the searches of this patch spent (references included)
        self.last: Optional[Schedule] = None  # the schedule of the latest call

    def choose(self, model, shape, forward: Callable[[], torch.Tensor]) -> Schedule:
        if self.fingerprint is None:
            self.fingerprint = model_fingerprint(model)
        key = (self.fingerprint, self.family, shape, options_key(self.runtime.opts))
        schedule = self.chosen.get(key)
        if schedule is None:
            schedule = self.cache.get(key)
            if schedule is not None:
                log.warning("tomesd-ext: ratio='auto' reuses the cached choice for this model and input %s: block "
                            "ratios %s (error %.4g), no extra forward", shape,
                            tuple(round(s.ratio, 4) for s in schedule.settings), schedule.info.get("error", math.nan))
            else:
                schedule = self._search(model, shape, forward)
                self.cache.put(key, schedule)
            self.chosen[key] = schedule
        self.runtime.settings = schedule.settings
        self.last = schedule
        return schedule

    def _search(self, model, shape, forward) -> Schedule:
        rt, opts = self.runtime, self.runtime.opts
        spent = 0

        def counted():
            nonlocal spent
            spent += 1
            return forward()

        start = time.perf_counter()
        self.searching = True
        try:
            result = search_runtime(rt, counted, opts.max_error)
        finally:
            self.searching = False
        self.extra_forwards += spent
        seconds = time.perf_counter() - start
        if result is None:  # no block merges at this input (e.g. its grid is below min_tokens)
            log.warning("tomesd-ext: ratio='auto': %s has no block that merges at input %s, so it is not merged "
                        "(said once per model and input)", type(model).__name__, shape)
            rt.settings = settings_of((0.0,))
            return Schedule(rt.settings, self.fingerprint, {"max_error": opts.max_error, "error": 0.0, "cost": 1.0,
                                                            "extra_forwards": spent, "input": repr(shape)})
        full = result.full_cost
        info = {
            "max_error": opts.max_error, "error": result.error, "cost": result.cost / full, "extra_forwards": spent,
            "search_seconds": round(seconds, 3), "family": self.family, "input": repr(shape),
            "points": [[list(r), e, c / full] for r, e, c in result.points],
        }
        if not any(result.ratios):
            log.warning("tomesd-ext: ratio='auto': no candidate kept the error within max_error=%.4g (the smallest "
                        "measured was %.4g), so this input is not merged; raise max_error to merge",
                        opts.max_error, min(e for r, e, _c in result.points if any(r)))
        log.warning(
            "tomesd-ext: ratio='auto' (max_error=%.4g) measured %d forwards in %.1f s on this call's input %s and "
            "chose block ratios %s: error %.4g, merged-operator cost %.3f of unmerged (said once per model and input)",
            opts.max_error, spent, seconds, shape, tuple(round(r, 4) for r in result.ratios), result.error, result.cost / full,
        )
        return Schedule(rt.settings, self.fingerprint, info)
