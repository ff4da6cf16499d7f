"""Where does merging pay? Time one self-attention call (SD1.5 widths, SDPA) with and without
ToMe at growing token counts; the result sets ToMeOptions.min_tokens (docs/benchmarks.md,
"Auto-skip rule").

    python -m tomesd_ext.bench.breakeven [--sides 16 24 32 48 64] [--ratios 0.3 0.5] [--repeats 7]

Merged = plan (partition + matching on the metric) + merge + attention + unmerge, the whole
cost a merged attn1 adds or saves; interleaved A/B calls, medians.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from ..core import ToMeOptions, merge, partition_seed, tome_plan, unmerge
from .timing import interleaved


def _attention(width: int, seed: int = 0):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    return Attention(query_dim=width, heads=8, dim_head=width // 8, bias=False).eval()


def measure(width: int, side: int, ratio: float, batch: int = 2, repeats: int = 7) -> dict:
    """Median seconds of one attn1 call on a side x side grid: baseline vs merged (ratio)."""
    attn = _attention(width)
    x = torch.randn(batch, side * side, width, generator=torch.Generator().manual_seed(side))
    opts = ToMeOptions.create(ratio=ratio, seed=0, min_tokens=0)

    def base():
        return attn(x)

    def merged():
        plan = tome_plan(x, side, side, opts, partition_seed(opts, 0, side, side))
        return unmerge(attn(merge(x, plan)), plan)

    with torch.no_grad():
        times = interleaved({"base": base, "merged": merged}, repeats, warmup=1)
    b, m = statistics.median(times["base"]), statistics.median(times["merged"])
    return {"width": width, "tokens": side * side, "ratio": ratio, "base_ms": b * 1e3, "merged_ms": m * 1e3, "speedup": b / m}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", type=int, nargs="+", default=[16, 24, 32, 48, 64])
    p.add_argument("--widths", type=int, nargs="+", default=[320, 640])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 2, attn1 only")
    print(f"{'width':>5} {'tokens':>6} {'ratio':>5} {'base ms':>9} {'merged ms':>9} {'speedup':>7}")
    for width in args.widths:
        for side in args.sides:
            for ratio in args.ratios:
                r = measure(width, side, ratio, repeats=args.repeats)
                print(f"{r['width']:>5} {r['tokens']:>6} {r['ratio']:>5.2f} {r['base_ms']:>9.2f} {r['merged_ms']:>9.2f} {r['speedup']:>6.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
