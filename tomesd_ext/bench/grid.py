"""Side-by-side grid of decoded results: one PNG per resolution, a row per input, a column per
configuration (baseline first)."""

from __future__ import annotations

import os
from typing import Dict, List


def save_grids(images: Dict[tuple, Dict[str, object]], folder: str) -> List[str]:
    """images: (resolution, input) -> {label: (H, W, 3) array in [0, 1]} -> written PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = []
    for res in sorted({k[0] for k in images}):
        rows = [(inp, images[(r, inp)]) for (r, inp) in images if r == res]
        labels = list(rows[0][1])
        fig, axes = plt.subplots(len(rows), len(labels), figsize=(2.2 * len(labels), 2.3 * len(rows)), squeeze=False)
        for i, (inp, by_label) in enumerate(rows):
            for j, name in enumerate(labels):
                ax = axes[i][j]
                ax.imshow(by_label[name], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(name, fontsize=8)
                if j == 0:
                    ax.set_ylabel(inp, fontsize=8)
        fig.tight_layout()
        path = os.path.join(folder, f"grid_{res}px.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
