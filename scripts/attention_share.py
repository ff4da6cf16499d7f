"""Where a UNet forward spends its time, by transformer-block part and level, unmerged vs ToMe.

Explains a whole-model speed-up with Amdahl's law: merging only shortens the self-attention
(attn1) of the merged levels, so the best whole-model speed-up is bounded by their share.
Times one forward per variant per round (interleaved, after a small warm-up), forward hooks around attn1/attn2/ff of
every BasicTransformerBlock, grouped by token count (level): tomesd_ext.bench.parts.

    python scripts/attention_share.py --model sd15 --resolution 1024 --ratio 0.5 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main(argv=None):
    from tomesd_ext import apply_tome, remove_tome
    from tomesd_ext.bench.parts import part_timer
    from tomesd_ext.bench.timing import timed
    from tomesd_ext.models import build_unet, get_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--max-downsample", default="auto")
    p.add_argument("--rounds", type=int, default=1)
    a = p.parse_args(argv)
    md = a.max_downsample if a.max_downsample == "auto" else int(a.max_downsample)

    unet = build_unet(a.model).eval()
    acc = part_timer(unet)
    g = torch.Generator().manual_seed(0)
    side = a.resolution // 8
    x = torch.randn(a.batch, 4, side, side, generator=g)
    ctx = torch.randn(a.batch, 77, get_config(a.model)["unet"]["cross_attention_dim"], generator=g)
    t = torch.tensor(500)
    runs = {"unmerged": [], "tome": []}
    with torch.no_grad():  # warm-up on a small latent (allocator, kernels), not timed
        unet(x[:, :, :32, :32], t, ctx)
    for _ in range(a.rounds):
        for variant in runs:
            if variant == "tome":
                apply_tome(unet, a.ratio, max_downsample=md, seed=0)
            acc.clear()
            with torch.no_grad():
                total = timed(lambda: unet(x, t, ctx))[1]
            runs[variant].append((total, dict(acc)))
            remove_tome(unet)

    def median_parts(rows):
        keys = rows[0][1].keys()
        return statistics.median(r[0] for r in rows), {k: statistics.median(r[1][k] for r in rows) for k in keys}

    base_total, base = median_parts(runs["unmerged"])
    tome_total, tome = median_parts(runs["tome"])
    print(f"{a.model} {a.resolution} px batch {a.batch}, ratio {a.ratio}, max_downsample {a.max_downsample}, "
          f"{torch.get_num_threads()} threads, median of {a.rounds} round(s)")
    print("| part | tokens | unmerged s | share | ToMe s |\n|---|---|---|---|---|")
    for key in sorted(base, key=lambda k: (-k[1], k[0])):
        print(f"| {key[0]} | {key[1]} | {base[key]:.2f} | {base[key] / base_total:.1%} | {tome[key]:.2f} |")
    rest_b = base_total - sum(base.values())
    rest_t = tome_total - sum(tome.values())
    print(f"| outside transformer blocks | - | {rest_b:.2f} | {rest_b / base_total:.1%} | {rest_t:.2f} |")
    print(f"| whole forward | - | {base_total:.2f} | 100% | {tome_total:.2f} ({base_total / tome_total:.2f}x) |")
    top = max(n for _, n in base)
    saved_ideal = base[("attn1", top)] * (1 - (1 - a.ratio) ** 2)
    print(f"Upper bound for merging only the {top}-token level at ratio {a.ratio} (zero merging overhead, all of "
          f"attn1 costing ~ tokens^2): {base_total / (base_total - saved_ideal):.2f}x")


if __name__ == "__main__":
    main()
