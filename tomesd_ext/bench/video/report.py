"""Video bench results: the stdout table, the JSON file and the bar-chart figure."""

from __future__ import annotations

import json
import os


def print_table(results: dict) -> None:
    attn = f"self-attention sharpened x{results['sharpen']:g}" if results["sharpen"] else "plain self-attention"
    print(f"model {results['model']} ({attn}), {results['steps']} steps, mode {results['mode']}, "
          f"chunk {results['chunk_size']}, {results['threads']} threads")
    print(f"{'clip':36s} {'method':10s} {'warp err':>9s} {'eps diff':>9s} {'s/frame':>8s} {'peak MiB':>9s}")
    for row in results["clips"]:
        for m, v in row["methods"].items():
            print(f"{row['clip'][:36]:36s} {m:10s} {v['warp_error']:9.5f} {v['eps_frame_diff_mean']:9.4f} "
                  f"{v['s_per_frame']:8.3f} {v['peak_rss_mb']:9.0f}")
        print(f"{'':36s} vidtome/per-frame: warp x{row['warp_ratio_vidtome_over_perframe']:.3f}, "
              f"eps diff x{row['eps_diff_ratio_vidtome_over_perframe']:.3f}, "
              f"time x{row['time_ratio_vidtome_over_perframe']:.3f} (input's own warp err {row['input_warp_error']:.5f})")
        if "probe" in row:
            pr = row["probe"]
            print(f"{'':36s} probe t={pr['timestep']}: eps frame change per-frame {pr['per-frame']:.4f}, "
                  f"vidtome {pr['vidtome']:.4f} (x{pr['ratio_vidtome_over_perframe']:.3f})")
    for r in results["memory"]:
        print(f"memory: {r['frames']:3d} frames {r['method']:10s} peak RSS +{r['peak_rss_mb']:.0f} MiB ({r['seconds']:.1f} s)")


def write_results(results: dict, path: str) -> None:
    """The results as indented JSON to `path` ('-' = stdout)."""
    from ...commands.checks import write_text_atomic

    text = json.dumps(results, indent=2)
    if path == "-":
        print(text)
    else:
        write_text_atomic(path, text)


def plot(results: dict, path: str) -> None:
    """PNG: warp error, noise-prediction frame change and s/frame per clip (bars per method),
    plus peak RSS against the video length when the memory check ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = results["clips"]
    fig, axes = plt.subplots(1, 4 if results["memory"] else 3, figsize=(17, 4))
    for ax, key, title in ((axes[0], "warp_error", "warp error (lower = more consistent)"),
                           (axes[1], "eps_frame_diff_mean", "noise-prediction frame change"),
                           (axes[2], "s_per_frame", "generation s/frame")):
        width = 0.38
        for j, m in enumerate(("per-frame", "vidtome")):
            ax.bar([i + j * width for i in range(len(clips))], [c["methods"][m][key] for c in clips], width, label=m)
        ax.set_xticks([i + width / 2 for i in range(len(clips))], [c["clip"][:20] for c in clips], fontsize=8)
        ax.set_title(title)
        ax.legend()
    if results["memory"]:
        ax = axes[3]
        for m in ("per-frame", "vidtome"):
            pts = [(r["frames"], r["peak_rss_mb"]) for r in results["memory"] if r["method"] == m]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        ax.set_xlabel("frames")
        ax.set_ylim(bottom=0)
        ax.set_title("peak RSS increase (MiB)")
        ax.legend()
    attn = f", attention sharpened x{results['sharpen']:g}" if results.get("sharpen") else ""
    fig.suptitle(f"{results['model']}{attn}: per-frame vs VidToMe ({results['steps']} steps, chunk {results['chunk_size']})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
