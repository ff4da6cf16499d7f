"""Sampling time inside ComfyUI: no merging vs ComfyUI's built-in TomePatchModel vs our
TomesdExtTokenMerging node at the same ratio, on the random-weight SD1.5 checkpoint.

Runs ComfyUI in this process (COMFYUI_PATH or --comfyui) on the CPU, samples with
comfy.sample.sample (the KSampler path) from random text conditioning, and times the three
variants interleaved (A/B/C, A/B/C, ...) per image size after a 1-step warm-up each; prints and
optionally writes medians. Full-size model: run it under `flock /tmp/tomesd_heavy.lock`.

    COMFYUI_PATH=/path/to/ComfyUI flock /tmp/tomesd_heavy.lock \\
        python scripts/bench_comfy.py --sizes 512:2:2 1024:1:1 --ratio 0.5
    (--variants builtin,ours leaves out the unmerged model, e.g. at 1024 px where it is slowest)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_comfy(path):
    sys.path.insert(0, REPO)
    import nodes as ours  # noqa: F401  (our package, cached before ComfyUI's nodes.py is on the path)

    sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401


def git_commit(path):
    try:
        return subprocess.check_output(["git", "-C", path, "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_size(text):
    """"SIZE[:STEPS[:REPEATS]]" -> (size, steps, repeats); defaults 2 steps, 2 repeats."""
    parts = [int(p) for p in text.split(":")]
    defaults = [None, 2, 2]
    size, steps, repeats = parts + defaults[len(parts):]
    return size, steps, repeats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default: $COMFYUI_PATH)")
    p.add_argument("--sizes", nargs="+", default=["512:2:2", "1024:1:1"], help="SIZE[:STEPS[:REPEATS]] in pixels")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--cache", default=os.environ.get("TOMESD_EXT_CACHE") or os.path.expanduser("~/.cache/tomesd_ext"))
    p.add_argument("--variants", default="none,builtin,ours", help="comma list of none (no merging), builtin (TomePatchModel), ours (default: all)")
    p.add_argument("--warmup-size", type=int, default=256, help="pixels of the 1-step warm-up sample of each variant (default 256)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if not a.comfyui:
        p.error("set COMFYUI_PATH or pass --comfyui")
    setup_comfy(a.comfyui)

    import torch
    from tqdm import tqdm

    import comfy.model_management
    import comfy.sample
    import comfy.sd
    from comfy_extras.nodes_tomesd import TomePatchModel

    from nodes.tome import TomesdExtTokenMerging
    from tomesd_ext.bench.timing import timed
    from tomesd_ext.models.checkpoint import cached_checkpoint

    ckpt = cached_checkpoint(a.cache, "sd15", seed=0)
    model = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=False)[0]
    spec = TomesdExtTokenMerging.INPUT_TYPES()["required"]
    ours_kw = {k: v[1]["default"] for k, v in spec.items() if k != "model"}
    ours_kw["ratio"] = a.ratio
    wanted = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - {"none", "builtin", "ours"})
    if unknown or not wanted:
        p.error(f"--variants {a.variants!r}: use a comma list of none, builtin, ours")
    makers = {
        "none": ("no merging", lambda: model),
        "builtin": (f"ComfyUI TomePatchModel (ratio {a.ratio})", lambda: TomePatchModel.execute(model, a.ratio).result[0]),
        "ours": (f"tomesd-ext ToMe node (ratio {a.ratio})", lambda: TomesdExtTokenMerging().patch(model, **ours_kw)[0]),
    }
    variants = {makers[v][0]: makers[v][1]() for v in wanted}
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 768, generator=g), {}]]
    uncond = [[torch.randn(1, 77, 768, generator=g), {}]]

    def sample(m, size, steps):
        """Seconds of one comfy.sample.sample call (the KSampler path, cond+uncond batched)."""
        latent = torch.zeros(1, 4, size // 8, size // 8)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
        # Switching between clones makes ComfyUI re-load (re-patch) the shared weights: do it
        # before the clock starts, so only sampling is timed.
        comfy.model_management.load_models_gpu([m])
        out, seconds = timed(lambda: comfy.sample.sample(m, noise, steps, a.cfg, a.sampler, "normal", cond, uncond,
                                                         latent, disable_pbar=True, seed=1))
        assert torch.isfinite(out).all()
        return seconds

    results = []
    for text in a.sizes:
        size, steps, repeats = parse_size(text)
        times = {name: [] for name in variants}
        with tqdm(total=len(variants) * (repeats + 1), desc=f"{size}px {steps} steps") as bar:
            for name, m in variants.items():  # warm-up: one small 1-step sample each, not recorded
                sample(m, a.warmup_size, 1)
                bar.update()
            for _ in range(repeats):
                for name, m in variants.items():
                    times[name].append(sample(m, size, steps))
                    bar.update()
        base = statistics.median(times["no merging"]) if "no merging" in times else None
        builtin = next((statistics.median(ts) for name, ts in times.items() if "TomePatchModel" in name), None)
        for name, ts in times.items():
            med = statistics.median(ts)
            results.append({"size": size, "steps": steps, "repeats": repeats, "variant": name, "median_s": med,
                            "times_s": ts, "speedup": base / med if base else None,
                            "vs_builtin": builtin / med if builtin else None})
    print(f"\ncheckpoint {os.path.basename(ckpt)}; ComfyUI {git_commit(a.comfyui)}; tomesd-ext {git_commit(REPO)}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; sampler {a.sampler}, cfg {a.cfg}")
    print("| size | steps | variant | median s (min-max) | speed-up vs no merging | speed-up vs TomePatchModel |")
    print("|---|---|---|---|---|---|")
    fmt = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
    for r in results:
        print(f"| {r['size']} px | {r['steps']} | {r['variant']} | {r['median_s']:.2f} ({min(r['times_s']):.2f}-"
              f"{max(r['times_s']):.2f}) | {fmt(r['speedup'])} | {fmt(r['vs_builtin'])} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"comfyui": git_commit(a.comfyui), "tomesd_ext": git_commit(REPO), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
