"""Per-block merge settings (a schedule), and the error-budget search that chooses them.

Block groups. The blocks of a patch that may merge (UNets: the transformer blocks at levels up to
``max_downsample``; transformers: the blocks left after ``skip_ends``), in execution order, are
split into G = len(settings) consecutive groups of near-equal size: block i of n is in group
``i * G // n``. One ``BlockSetting`` per group: a ratio and a sampling window [start, end]
(fractions of the sampling run done, as ComfyUI's start/end percent): outside its window the
group merges nothing. ``MergeRuntime`` reads the ratio of each block call (``block_ratio``).

The error budget (``ratio="auto"``, ``max_error``). ``search`` chooses one ratio per search
group (``search_groups``: every block alone when there are at most G = 5, else the first block,
three consecutive groups of the others and the last block), from measured sensitivities:

1. the reference: one forward with nothing merged (the caller's);
2. sensitivity: each group g alone at the maximum ratio (G forwards): e_g;
3. shape: one setting with ratios below the maximum (a point the caller measured already, else
   every group at maximum / 2: 1 forward) fixes the exponent p of the model: group g at ratio r
   adds e_g * (r / maximum) ** p, and the groups' errors add like independent noise (the root of
   the sum of their squares; a plain sum over-predicts uniform settings about twofold on the
   sharpened PixArt-Σ and SD 1.5 architectures), so the model is exact at the shape point;
4. allocation and verification: of the grid {0, 1/12, ..., 1} x maximum per group, the setting
   of least cost whose predicted error times a correction k (1 at first) is within the budget is
   measured, k becomes measured / predicted (a pick over the budget makes the next one more
   careful, one under it bolder), and this repeats (at most ``verify`` forwards) until the next
   pick would be no cheaper than the best setting measured within the budget.

The choice is the cheapest *measured* setting whose error is within the budget (the probes
count; the reference, nothing merged, error 0, is the fallback), so the budget is never exceeded
on the input that was measured. Forwards: at most 1 + G + 1 + verify (G = 5, verify = 5: 12).
Points measured already (``known``: e.g. a uniform ratio the caller ran) join the candidates.
Deterministic: the grid, the fit and the ties (cheaper, then lower predicted error, then the
ratios in order) depend on the measured errors only. "Cheapest" is ``block_cost``: the
multiply-adds of a block's merged operators at its merged token count, summed over the blocks
(measured time is not deterministic); the chosen schedule has one setting per block.
"""

from __future__ import annotations

import hashlib
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
AUTO_GROUPS = 5  # block groups the budget search sets independently (at most)
AUTO_VERIFY = 5  # verification forwards of the search, after the probes
GRID_STEPS = 12  # ratios searched: maximum * k / GRID_STEPS, k = 0..GRID_STEPS
MAX_GROUPS = 256  # per-group settings a schedule may hold (the search writes one per block)



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
    if len(value) > MAX_GROUPS:
        raise OptionError(f"{name} has {len(value)} groups: allowed 1 to {MAX_GROUPS}")
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


def search_groups(n_blocks: int, groups: int = AUTO_GROUPS) -> Tuple[Tuple[int, ...], ...]:
    """The blocks (numbers 0..n_blocks-1, execution order) the budget search sets together: every
    block alone when there are at most ``groups``; otherwise the first and the last block alone
    and the others in ``groups - 2`` consecutive groups of near-equal size (``group_of``). The
    first and last blocks of a denoiser are the ones most likely to differ (they touch the
    embeddings and the output projection)."""
    if n_blocks <= 0:
        return ()
    if n_blocks <= groups or groups < 3:
        per = min(groups, n_blocks)
        out = [[] for _ in range(per)]
        for b in range(n_blocks):
            out[group_of(b, n_blocks, per)].append(b)
        return tuple(tuple(g) for g in out)
    inner = n_blocks - 2
    middle = [[] for _ in range(groups - 2)]
    for i in range(inner):
        middle[group_of(i, inner, groups - 2)].append(i + 1)
    return ((0,),) + tuple(tuple(g) for g in middle) + ((n_blocks - 1,),)


def per_block(group_ratios: Sequence[float], groups: Sequence[Sequence[int]], n_blocks: int) -> Tuple[float, ...]:
    """The ratio of every block given one ratio per search group (``search_groups``)."""
    out = [0.0] * n_blocks
    for r, blocks in zip(group_ratios, groups):
        for b in blocks:
            out[b] = float(r)
    return tuple(out)


def group_spans(groups: Sequence[Sequence[int]]) -> str:
    """Search groups for people: "0 | 1-9 | 10-18 | 19-26 | 27"."""
    return " | ".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else f"{g[0]}" for g in groups if g)


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
    point (ratios, error, cost), the forwards spent (the reference included), and the fitted error
    model (``exponent`` p of the groups' errors, ``correction`` k at the end)."""

    ratios: Tuple[float, ...]
    error: float
    cost: float
    full_cost: float  # cost with nothing merged
    points: List[Tuple[Tuple[float, ...], float, float]]
    forwards: int
    exponent: float = 1.0
    correction: float = 1.0
    groups: Optional[Tuple[Tuple[int, ...], ...]] = None  # blocks of each group (search_runtime)


def _fit_exponent(singles: Sequence[float], maximum: float, ratios: Sequence[float], error: float) -> float:
    """The p with sqrt(sum_g (singles[g] * (ratios[g] / maximum) ** p) ** 2) == error, in [0.25, 4]
    (bisection; the left side falls as p grows, since every ratio is at most the maximum)."""

    def model(p):
        return math.sqrt(sum((e * (r / maximum) ** p) ** 2 for e, r in zip(singles, ratios) if r > 0))

    lo, hi = 0.25, 4.0
    if error >= model(lo):
        return lo
    if error <= model(hi):
        return hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if model(mid) > error:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def search(measure: Callable[[Tuple[float, ...]], float], cost: Callable[[Tuple[float, ...]], float],
           groups: int, maximum: float, max_error: float, verify: int = AUTO_VERIFY,
           known: Optional[Dict[Tuple[float, ...], float]] = None, steps: int = GRID_STEPS) -> SearchResult:
    """The budget search of the module docstring. measure(ratios) -> relative error of the output
    with those group ratios (against the reference the caller measured: 1 forward); cost(ratios):
    a sum over the groups (cost(a) - cost(zero) adds over groups, as ``runtime_cost``); known:
    errors the caller measured already (not measured again, not counted as forwards)."""
    if (steps + 1) ** groups > 4_000_000:  # the grid is enumerated whole
        raise ValueError(f"search over {groups} groups with {steps + 1} ratios each is too large a grid: "
                         f"use at most {AUTO_GROUPS} groups (search_groups) or fewer steps")
    zero = (0.0,) * groups
    known = {tuple(float(r) for r in s): float(e) for s, e in (known or {}).items()}
    points = {zero: 0.0, **known}
    order = [zero]

    def run(ratios):
        if ratios not in points:
            points[ratios] = float(measure(ratios))
            order.append(ratios)
        return points[ratios]

    # 1. sensitivity: each group alone at the maximum
    singles = [run(tuple(maximum if i == g else 0.0 for i in range(groups))) for g in range(groups)]

    # 2. the shape of the error curve: one point with ratios below the maximum (a known one, or
    #    every group at maximum / 2) fixes the exponent p of e_g(r) = singles[g] * (r / maximum) ** p
    def informative(s):
        return any(0 < r < maximum for r in s) and points[s] > 0 and any(
            e > 0 and r > 0 for e, r in zip(singles, s))

    shaped = sorted(s for s in known if informative(s))
    shape = shaped[0] if shaped else tuple(maximum / 2 for _ in range(groups))
    run(shape)
    p = _fit_exponent(singles, maximum, shape, points[shape]) if informative(shape) else 1.0

    # 3. allocation: the cheapest grid setting whose predicted error (the root of the sum of the
    #    groups' squared errors, times a correction k that each verification updates) is within the
    #    budget; measured, then the next, until a pick would be no cheaper than the best setting
    #    measured within the budget
    levels = [maximum * k / steps for k in range(steps + 1)]
    base = cost(zero)
    dims = [len(levels)] * groups
    costs = torch.zeros((), dtype=torch.float64)
    errs2 = torch.zeros((), dtype=torch.float64)
    for g in range(groups):
        view = [1] * groups
        view[g] = len(levels)
        alone = [tuple(r if i == g else 0.0 for i in range(groups)) for r in levels]
        costs = costs + torch.tensor([cost(s) - base for s in alone], dtype=torch.float64).view(view)
        errs2 = errs2 + torch.tensor([(singles[g] * (r / maximum) ** p) ** 2 for r in levels],
                                     dtype=torch.float64).view(view)
    costs, errs2 = costs.reshape(-1) + base, errs2.reshape(-1)

    def index_of(s):
        idx = 0
        for r in s:
            k = round(r / maximum * steps) if maximum > 0 else 0
            if not math.isclose(levels[k], r, rel_tol=0, abs_tol=1e-12):
                return None
            idx = idx * len(levels) + k
        return idx

    def ratios_at(idx):
        out = []
        for d in reversed(dims):
            out.append(levels[idx % d])
            idx //= d
        return tuple(reversed(out))

    def predicted(s):
        return math.sqrt(sum((e * (r / maximum) ** p) ** 2 for e, r in zip(singles, s) if r > 0))

    def best_measured():
        return min((cost(s), e, s) for s, e in points.items() if e <= max_error)

    measured_idx = [i for i in (index_of(s) for s in points) if i is not None]
    k = 1.0
    for _ in range(verify):
        allowed = errs2 * k * k <= max_error * max_error
        if measured_idx:
            allowed[torch.tensor(measured_idx)] = False
        if not bool(allowed.any()):
            break
        c = torch.where(allowed, costs, torch.full_like(costs, math.inf))
        cheapest = c.min()
        ties = torch.nonzero((c == cheapest) & allowed).reshape(-1)
        pick_idx = int(ties[torch.argmin(errs2[ties])])  # argmin: the first of equal errors (ratios in order)
        pick = ratios_at(pick_idx)
        if cost(pick) >= best_measured()[0]:
            break
        error = run(pick)
        measured_idx.append(pick_idx)
        guess = predicted(pick)
        if guess > 0 and error > 0:
            k = error / guess
    c, e, s = best_measured()
    listed = [(r, points[r], cost(r)) for r in order]
    return SearchResult(s, e, c, cost(zero), listed, len(order), p, k)  # forwards: the reference and `order`


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
    set before each forward. The search groups are ``search_groups`` of the blocks that merged in
    the reference forward; the chosen settings are left on the runtime, one per block (the
    result's ``ratios`` are per group, ``result.groups`` the blocks of each). None (and nothing
    merged) when the model has no block to merge."""
    runtime.settings = settings_of((0.0,))
    runtime.record_shapes = True
    try:
        reference = forward()  # nothing merged; fills block_shapes
    finally:
        runtime.record_shapes = False
    merging = sorted(runtime.block_shapes)
    if not merging or runtime.n_blocks == 0:
        return None
    parts = tuple(tuple(merging[i] for i in part) for part in search_groups(len(merging), groups))
    n = runtime.n_blocks

    def measure(ratios):
        runtime.settings = settings_of(per_block(ratios, parts, n))
        return relative_error(forward(), reference)

    result = search(measure, lambda r: runtime_cost(runtime, per_block(r, parts, n)), len(parts),
                    runtime.opts.ratio, max_error, verify)
    result.groups = parts
    runtime.settings = settings_of(per_block(result.ratios, parts, n))
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
            "groups": [list(g) for g in result.groups], "group_ratios": list(result.ratios),
            "exponent": round(result.exponent, 4),
            "points": [[list(r), e, c / full] for r, e, c in result.points],
        }
        if not any(result.ratios):
            log.warning("tomesd-ext: ratio='auto': no candidate kept the error within max_error=%.4g (the smallest "
                        "measured was %.4g), so this input is not merged; raise max_error to merge",
                        opts.max_error, min(e for r, e, _c in result.points if any(r)))
        log.warning(
            "tomesd-ext: ratio='auto' (max_error=%.4g) measured %d forwards in %.1f s on this call's input %s and "
            "chose ratios %s for the blocks %s: error %.4g, merged-operator cost %.3f of unmerged (said once per model "
            "and input)", opts.max_error, spent, seconds, shape, tuple(round(r, 4) for r in result.ratios),
            group_spans(result.groups), result.error, result.cost / full,
        )
        return Schedule(rt.settings, self.fingerprint, info)
