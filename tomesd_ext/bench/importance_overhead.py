"""What does importance mode add to ToMe's cost? Interleaved medians of the three parts:

    python -m tomesd_ext.bench.importance_overhead [--side 64] [--width 320] [--ratio 0.5] [--repeats 30]

- per merged block: `tome_plan` (window partition + matching) vs `importance_plan` (the same
  matching with the importance partition and priority key);
- per denoiser call: CFG layout check + importance map + pooling + partition (done once per step
  and level, shared by every block of the level).
The UNet forward itself is the same for both modes, so these parts are the whole difference.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from ..core import ToMeOptions, derive_seed, tome_plan
from ..core.importance import image_rows, importance_map, importance_partitions, importance_plan, pool_to_grid
from ..core import detect_cfg_layout as detect_layout
from .timing import timed


def measure(side: int = 64, width: int = 320, ratio: float = 0.5, repeats: int = 30, seed: int = 0) -> dict:
    """Median milliseconds of each part for one image with CFG (batch 2) on a side x side grid."""
    g = torch.Generator().manual_seed(seed)
    opts = ToMeOptions.create(ratio=ratio, seed=seed, min_tokens=0)
    metric = torch.randn(2, side * side, width, generator=g)
    pred = torch.randn(2, 4, side, side, generator=g)
    sample = torch.randn(1, 4, side, side, generator=g).repeat(2, 1, 1, 1)
    rows = image_rows(2, "halves")

    def per_step(step):
        layout = detect_layout(sample)
        hmap = importance_map(pred, layout)
        pooled = pool_to_grid(hmap, side, side)
        return importance_partitions(pooled, side, side, ratio, 2, 2, opts.pool_factor, derive_seed(seed, step))

    parts = per_step(0)
    times = {"tome_plan_ms": [], "importance_plan_ms": [], "per_step_ms": []}
    for i in range(repeats):
        times["tome_plan_ms"].append(timed(lambda: tome_plan(metric, side, side, opts, derive_seed(seed, "tome", i)))[1])
        times["importance_plan_ms"].append(timed(lambda: importance_plan(metric, parts, rows, (side, side)))[1])
        times["per_step_ms"].append(timed(lambda: per_step(i))[1])
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=64, help="token grid side (64 = SD1.5 512 px, level d=1)")
    p.add_argument("--width", type=int, default=320, help="metric channels (320 = SD1.5 level d=1)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    result = measure(args.side, args.width, args.ratio, args.repeats)
    for k, v in result.items():
        print(f"{k}: {v:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
