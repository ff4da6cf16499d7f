"""Speed-up against fidelity: one line per (method, resolution) over its ratios (matplotlib)."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import List, Optional


def plot_tradeoff(rows: List[dict], path: str, input_name: Optional[str] = None, title: str = "") -> str:
    """Save a PNG: x = rel_error of the noise prediction, y = speed-up over the baseline.

    input_name: which input's fidelity to show (default: the first input in the rows).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no rows to plot")
    input_name = input_name or rows[0]["input"]
    lines = defaultdict(list)
    for r in rows:
        if r["input"] == input_name and r["method"] != "baseline":
            lines[(r["method"], r["resolution"])].append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(1.0, color="grey", lw=1, ls="--", label="baseline")
    for (method, res), pts in sorted(lines.items()):
        pts.sort(key=lambda r: (r["ratio"] is None, r["ratio"] or 0))
        xs, ys = [p["rel_error"] for p in pts], [p["speedup"] for p in pts]
        ax.plot(xs, ys, marker="o", label=f"{method} {res}px")
        for p in pts:
            if p["ratio"] is not None:
                ax.annotate(f"{p['ratio']:g}", (p["rel_error"], p["speedup"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"relative L2 error of the noise prediction ({input_name} input; lower is better)")
    ax.set_ylabel("speed-up over baseline (higher is better)")
    ax.set_title(title or "speed-up vs fidelity (labels: merge ratio)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
