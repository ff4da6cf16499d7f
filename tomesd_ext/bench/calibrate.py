"""`tomesd-ext calibrate`: per-block ratios for one model under an error budget, measured on
short sampling runs, written as a schedule file that ``apply_tome(schedule=PATH)`` loads.

The search is the one ``ratio="auto"`` runs at a call (core.schedule.search: a reference, one
probe per search group, at most five verifications; the uniform setting measured first is a
candidate and fixes the error model's exponent, so no shape forward is spent), with one measurement = one sampling run of
``steps`` steps (0: one denoiser forward) and the error = the relative L2 error of its output
(the final latents; one forward: the noise prediction) against the unmerged run on the same
input and seed. The budget is a number, or the error of a uniform ratio measured first
("equal error": the schedule then merges where it costs least error for the same total). Every
run is timed once as it is measured; baseline, uniform and chosen are timed again side by side
(``repeats`` rounds, rotated order) for the speed-ups of the table.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from ..core.options import ToMeOptions
from ..core.schedule import (
    AUTO_GROUPS, AUTO_VERIFY, Schedule, group_spans, model_fingerprint, per_block, runtime_cost, search, search_groups,
    settings_of,
)
from .denoise import denoise
from .metrics import rel_error
from .timing import round_order, timed


@dataclass
class Calibration:
    """The chosen schedule and every measured row: {"setting", "ratios", "error", "seconds",
    "cost"} (cost: the cost model's merged-operator multiply-adds, relative to nothing merged)."""

    schedule: Schedule
    rows: List[dict] = field(default_factory=list)
    budget: float = 0.0
    chosen: Optional[dict] = None
    uniform: Optional[dict] = None
    baseline_seconds: float = 0.0
    forwards: int = 0
    groups: tuple = ()  # the blocks of each search group; "ratios" of the rows are per group


def calibrate(subject, resolution, steps: int = 0, budget: Optional[float] = None, uniform_ratio: float = 0.5,
              batch: int = 2, seed: int = 0, timestep: int = 500, input_kind: str = "photo", repeats: int = 1,
              groups: int = AUTO_GROUPS, min_tokens=None, clock: str = "wall",
              out: Callable[[str], None] = print) -> Calibration:
    """Search per-group ratios for ``subject`` (bench.subject.Subject) within ``budget`` (None:
    the error of uniform ``uniform_ratio``); returns the Calibration (module docstring).
    min_tokens: apply_tome's (None: its default); clock: bench.timing's "wall" or "cpu"; groups: the
    most search groups (core.schedule.search_groups)."""
    from ..diffusers import apply_tome, remove_tome
    from ..diffusers.tome import PATCH_ATTR, installed_patch

    model = subject.denoiser
    common = {"seed": seed, "min_tokens": min_tokens}
    cfg = batch % 2 == 0
    n_images = batch // 2 if cfg else batch
    inp = subject.bench_input(input_kind, n_images, resolution, seed)
    cond = subject.conditioning(n_images, cfg, resolution, seed)

    def run():
        result, seconds = timed(lambda: denoise(subject, inp, cond, cfg, steps, timestep), subject.device, clock)
        return (result.final if result.final is not None else result.noise_pred), seconds

    remove_tome(model)
    run()  # warm-up: the first call pays allocations and lazy initialisation
    reference, base_s = run()
    forwards = 2
    cal = Calibration(Schedule(()), baseline_seconds=base_s)
    out(f"baseline (nothing merged): {base_s:.2f} s")

    apply_tome(model, ratio=uniform_ratio, **common)
    runtime = installed_patch(model, PATCH_ATTR).runtime
    runtime.record_shapes = True  # the blocks' token counts and widths: the cost model's input
    uniform_out, uniform_s = run()
    runtime.record_shapes = False
    forwards += 1
    if not runtime.block_shapes:
        remove_tome(model)
        raise ValueError(f"no block of {subject.name} merges at {resolution} px (its token grids are below "
                         f"min_tokens={runtime.opts.min_tokens}): use a larger --resolution or --min-tokens 0")
    merging, n = sorted(runtime.block_shapes), runtime.n_blocks
    parts = tuple(tuple(merging[i] for i in part) for part in search_groups(len(merging), groups))
    cal.groups = parts

    def blocks(ratios):  # the ratio of every block
        return per_block(ratios, parts, n)

    def model_cost(ratios):
        return runtime_cost(runtime, blocks(ratios))

    full = model_cost((0.0,) * len(parts))
    uniform_ratios = (float(installed_patch(model, PATCH_ATTR).opts.ratio),) * len(parts)
    cal.uniform = {"setting": f"uniform {uniform_ratio:g}", "ratios": uniform_ratios,
                   "error": rel_error(uniform_out, reference), "seconds": uniform_s,
                   "cost": model_cost(uniform_ratios) / full}
    cal.rows.append(cal.uniform)
    cal.budget = cal.uniform["error"] if budget is None else budget
    out(f"uniform {uniform_ratio:g}: error {cal.uniform['error']:.4g}, {uniform_s:.2f} s; budget {cal.budget:.4g}")

    seconds = {}

    def measure(ratios):
        nonlocal forwards
        apply_tome(model, block_ratios=list(blocks(ratios)), **common)
        output, s = run()
        forwards += 1
        seconds[ratios] = s
        error = rel_error(output, reference)
        out(f"  group ratios {_fmt(ratios)}: error {error:.4g}, {s:.2f} s")
        return error

    maximum = ToMeOptions.create(ratio="auto", max_error=1.0, seed=seed).ratio  # what ratio="auto" searches up to
    result = search(measure, model_cost, len(parts), maximum, cal.budget, AUTO_VERIFY,
                    known={uniform_ratios: cal.uniform["error"]})
    out(f"search groups (blocks) {group_spans(parts)}; fitted exponent {result.exponent:.3g}")
    for ratios, error, cost in result.points:
        if any(ratios):
            cal.rows.append({"setting": f"blocks {_fmt(ratios)}", "ratios": ratios, "error": error,
                             "seconds": seconds[ratios], "cost": cost / full})
    cal.chosen = next((r for r in cal.rows if r["ratios"] == result.ratios), None)
    if cal.chosen is None:  # nothing within the budget: nothing merged
        cal.chosen = {"setting": "nothing merged", "ratios": result.ratios, "error": 0.0, "seconds": base_s, "cost": 1.0}

    # side by side: baseline, uniform, chosen (rotated order; medians)
    runs = {"baseline": None, "uniform": list(blocks(cal.uniform["ratios"])), "chosen": list(blocks(result.ratios))}
    times = {k: [] for k in runs}
    for rep in range(repeats):
        for name in round_order(list(runs), rep, "rotate"):
            if runs[name] is None or not any(runs[name]):
                remove_tome(model)
            else:
                apply_tome(model, block_ratios=runs[name], **common)
            times[name].append(run()[1])
            forwards += 1
    remove_tome(model)
    cal.baseline_seconds = statistics.median(times["baseline"])
    cal.uniform["timed"] = statistics.median(times["uniform"])
    cal.chosen["timed"] = statistics.median(times["chosen"])
    cal.forwards = forwards
    info = {
        "resolution": resolution, "steps": steps, "batch": batch, "seed": seed, "input": input_kind,
        "budget": cal.budget, "uniform_ratio": uniform_ratio, "error": cal.chosen["error"],
        "speedup": cal.baseline_seconds / cal.chosen["timed"], "uniform_speedup": cal.baseline_seconds / cal.uniform["timed"],
        "uniform_error": cal.uniform["error"], "model": subject.name, "sharpened": subject.sharpened,
        "groups": [list(g) for g in parts], "group_ratios": list(result.ratios), "exponent": result.exponent,
        "uniform_cost": cal.uniform["cost"], "cost": cal.chosen["cost"],
        "rows": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in cal.rows],
    }
    cal.schedule = Schedule(settings_of(blocks(result.ratios)), model_fingerprint(model), info)
    return cal


def _fmt(ratios) -> str:
    return "(" + ", ".join(f"{r:.3g}" for r in ratios) + ")"


def table(cal: Calibration) -> str:
    """The calibration as a markdown table: setting, cost model, speed-up, error (chosen marked)."""
    lines = ["| setting | group ratios | merged-op cost | speed-up (one run) | speed-up (side by side) | error |",
             "|---|---|---|---|---|---|"]
    base = cal.baseline_seconds
    for r in cal.rows:
        mark = " **chosen**" if r is cal.chosen else ""
        timed_col = f"{base / r['timed']:.2f}x" if "timed" in r else ""
        lines.append(f"| {r['setting']}{mark} | {_fmt(r['ratios'])} | {r['cost']:.3f} | {base / r['seconds']:.2f}x | "
                     f"{timed_col} | {r['error']:.4g} |")
    return "\n".join(lines)


def plot(cal: Calibration, path: str, title: str = "") -> str:
    """Save a PNG of error vs speed-up with the chosen point and the uniform setting marked and
    the budget drawn (matplotlib, the [bench] extra). Speed-up: of the merged blocks by the cost
    model (1 / merged-operator cost; deterministic, unlike single timed runs on a busy machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [1.0 / r["cost"] for r in cal.rows]
    ax.scatter(xs, [r["error"] for r in cal.rows], color="tab:blue", label="measured settings")
    for r, x in zip(cal.rows, xs):
        ax.annotate(_fmt(r["ratios"]), (x, r["error"]), textcoords="offset points", xytext=(4, 3), fontsize=6)
    u, c = cal.uniform, cal.chosen
    ax.scatter([1.0 / u["cost"]], [u["error"]], marker="s", s=110, facecolors="none", edgecolors="tab:orange",
               label=u["setting"])
    ax.scatter([1.0 / c["cost"]], [c["error"]], marker="*", s=220, color="tab:red", label="chosen")
    ax.axhline(cal.budget, color="grey", ls="--", lw=1, label=f"budget {cal.budget:.3g}")
    ax.set_xlabel("speed-up of the merged blocks (cost model: 1 / merged-operator multiply-adds)")
    ax.set_ylabel("relative L2 error of the output")
    ax.set_title(title or "calibration: error vs speed-up")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
