"""ratio="auto" against a uniform ratio at the uniform ratio's error, one denoiser forward.

    python scripts/bench_auto_budget.py --model sd15 --resolution 1024 --batch 1 --clock cpu --json out.json

On a built-in model (random weights, sharpened attention) or a local checkpoint: the unmerged
forward (the reference), the uniform ``--ratio`` (its error is the budget), then
``apply_tome(ratio="auto", max_error=budget, schedule_cache=DIR)`` on the same input: its first
call searches (the extra forwards are counted) and runs merged with the choice; then a fresh
patch with the same cache runs the call again with no extra forward (checked; its output must
equal the first call's). Speed: the whole forward's floating-point operations
(torch.utils.flop_counter, deterministic; CPU attention counted too) and the cost model of the
merged operators, next to timings of baseline, uniform and auto (cached) side by side
(``--repeats`` rounds, rotated order; ``--clock cpu``: CPU seconds, which waiting for a core on
a loaded machine does not add to).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils import flop_counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tomesd_ext import apply_tome, remove_tome  # noqa: E402
from tomesd_ext.bench.denoise import denoise  # noqa: E402
from tomesd_ext.bench.metrics import rel_error  # noqa: E402
from tomesd_ext.bench.subject import load_subject  # noqa: E402
from tomesd_ext.bench.timing import round_order, timed  # noqa: E402
from tomesd_ext.core.schedule import ScheduleCache, group_spans, runtime_cost  # noqa: E402
from tomesd_ext.diffusers import tome_schedule  # noqa: E402
from tomesd_ext.diffusers.tome import PATCH_ATTR, installed_patch  # noqa: E402


def _cpu_attention_flops():
    """flop_counter has no formula for the CPU flash-attention kernel: the same as the others."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)  # shapes: the registry passes them


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ratio", type=float, default=0.5, help="the uniform ratio whose error is the budget")
    p.add_argument("--timestep", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--clock", default="cpu", choices=("wall", "cpu"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    _cpu_attention_flops()

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()  # at the start
    subject = load_subject(args.model, seed=args.seed)
    model = subject.denoiser
    cfg = args.batch % 2 == 0
    n_images = args.batch // 2 if cfg else args.batch
    inp = subject.bench_input("photo", n_images, args.resolution, args.seed)
    cond = subject.conditioning(n_images, cfg, args.resolution, args.seed)
    common = {"seed": args.seed, "min_tokens": args.min_tokens}

    def forward():
        return denoise(subject, inp, cond, cfg, 0, args.timestep).noise_pred

    def counted():
        with flop_counter.FlopCounterMode(display=False) as fc:
            out = forward()
        return out, fc.get_total_flops()

    def say(msg):
        print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {msg}", flush=True)

    remove_tome(model)
    reference, base_flops = counted()
    say(f"baseline: {base_flops / 1e9:.1f} GFLOP")

    apply_tome(model, ratio=args.ratio, **common)
    runtime = installed_patch(model, PATCH_ATTR).runtime
    runtime.record_shapes = True
    uniform_out, uniform_flops = counted()
    runtime.record_shapes = False
    budget = rel_error(uniform_out, reference)
    n = runtime.n_blocks
    full_cost = runtime_cost(runtime, (0.0,) * n)
    uniform_cost = runtime_cost(runtime, (args.ratio,) * n) / full_cost
    say(f"uniform {args.ratio}: error {budget:.5g}, {uniform_flops / 1e9:.1f} GFLOP, merged-op cost {uniform_cost:.4f}")

    cache = tempfile.mkdtemp(prefix="tomesd-auto-")
    auto = dict(ratio="auto", max_error=budget, schedule_cache=cache, **common)
    ScheduleCache.memory.clear()
    apply_tome(model, **auto)
    start = time.perf_counter()
    auto_out = forward()
    search_s = time.perf_counter() - start
    patch = installed_patch(model, PATCH_ATTR)
    extra = patch.auto.extra_forwards
    schedule = tome_schedule(model)
    ratios = [s.ratio for s in schedule.settings]
    auto_error = rel_error(auto_out, reference)
    auto_cost = runtime_cost(runtime, tuple(ratios) + (0.0,) * (n - len(ratios))) / full_cost if len(ratios) == n else None
    say(f"auto: {extra} extra forwards in {search_s:.1f} s (wall, the call included); groups "
        f"{group_spans(schedule.info.get('groups', []))} ratios {schedule.info.get('group_ratios')}; "
        f"error {auto_error:.5g} (budget {budget:.5g}); merged-op cost {auto_cost}")

    ScheduleCache.memory.clear()  # the rerun reads the choice from the folder
    apply_tome(model, **auto)
    cached_out, auto_flops = counted()
    cached_extra = installed_patch(model, PATCH_ATTR).auto.extra_forwards
    say(f"auto, cached rerun: {cached_extra} extra forwards, output equal: {torch.equal(cached_out, auto_out)}, "
        f"{auto_flops / 1e9:.1f} GFLOP")

    setups = {"baseline": lambda: remove_tome(model), "uniform": lambda: apply_tome(model, ratio=args.ratio, **common),
              "auto": lambda: apply_tome(model, **auto)}
    times = {k: [] for k in setups}
    rerun_extra = []
    for rep in range(args.repeats):
        for name in round_order(list(setups), rep, "rotate"):
            setups[name]()
            times[name].append(timed(forward, subject.device, args.clock)[1])
            if name == "auto":
                rerun_extra.append(installed_patch(model, PATCH_ATTR).auto.extra_forwards)
            say(f"  {name}: {times[name][-1]:.2f} s ({args.clock})")
    remove_tome(model)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model, "resolution": args.resolution, "batch": args.batch, "timestep": args.timestep,
        "seed": args.seed, "min_tokens": args.min_tokens, "sharpened": subject.sharpened, "commit": commit,
        "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average": os.getloadavg(), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "clock": args.clock, "repeats": args.repeats,
        "uniform_ratio": args.ratio, "budget": budget, "n_blocks": n,
        "auto": {"extra_forwards": extra, "search_seconds_wall": search_s, "error": auto_error,
                 "block_ratios": ratios, "group_ratios": schedule.info.get("group_ratios"), "groups": schedule.info.get("groups"), "exponent": schedule.info.get("exponent"),
                 "points": schedule.info.get("points"), "cached_rerun_extra_forwards": cached_extra,
                 "timed_rerun_extra_forwards": rerun_extra, "cached_output_equal": torch.equal(cached_out, auto_out)},
        "gflop": {"baseline": base_flops / 1e9, "uniform": uniform_flops / 1e9, "auto": auto_flops / 1e9},
        "merged_op_cost": {"uniform": uniform_cost, "auto": auto_cost},
        "seconds": times, "median_seconds": med,
        "speedup_auto_vs_uniform": {"flops": uniform_flops / auto_flops,
                                    "merged_op_cost": uniform_cost / auto_cost if auto_cost else None,
                                    "timed": med["uniform"] / med["auto"]},
        "speedup_vs_baseline": {"uniform_timed": med["baseline"] / med["uniform"], "auto_timed": med["baseline"] / med["auto"],
                                "uniform_flops": base_flops / uniform_flops, "auto_flops": base_flops / auto_flops},
    }
    say(json.dumps({k: result[k] for k in ("speedup_auto_vs_uniform", "speedup_vs_baseline", "load_average")}))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
