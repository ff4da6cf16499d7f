"""One denoiser forward of a quantized Flux.1 in ComfyUI, with and without our ToMe node: the
safetensors model (ComfyUI's loader) next to the same weights as GGUF Q8_0 / Q4_K files through
ComfyUI-GGUF's "Unet Loader (GGUF)".

The files are the random-weight ones of the tests (tests/comfy/quant_files.py: Flux.1-dev at its
real width 3072, 1 double + 1 single block, written once into $TOMESD_EXT_CACHE/dit_files). Runs
ComfyUI in this process on the CPU (COMFYUI_PATH), ComfyUI-GGUF from COMFYUI_PACKS_DIR; each
round times every loader without and with the node (ratio, defaults otherwise), interleaved;
prints and optionally writes medians and speed-ups (unmerged / merged, per loader).

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PACKS_DIR=~/.cache/tomesd_ext/packs \\
        python scripts/bench_comfy_gguf.py --size 1024 --repeats 1 --json docs/results/comfyui_gguf_flux_1024.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024, help="image size in pixels (latent / 8, tokens / 16 per side)")
    p.add_argument("--text", type=int, default=512, help="text tokens (Flux.1-dev's T5 length: 512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--loaders", default="safetensors,gguf-Q8_0,gguf-Q4_K", help="comma list of quant_files.LOADERS")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if not os.environ.get("COMFYUI_PATH"):
        p.error("set COMFYUI_PATH (and COMFYUI_PACKS_DIR for the GGUF loaders)")
    sys.path[:0] = [REPO, os.path.join(REPO, "tests", "comfy")]

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import quant_files
    from comfy_env import tome_node
    from dit_models import run_dit

    loaders = a.loaders.split(",")
    models = {name: quant_files.load("flux", name) for name in loaders}
    x, ctx, conds = quant_files.inputs("flux", batch=a.batch, hw=(a.size // 8, a.size // 8), n_txt=a.text)
    variants = [(name, ratio) for name in loaders for ratio in (None, a.ratio)]
    times = {v: [] for v in variants}
    for r in range(a.repeats):
        for name, ratio in variants:
            model = models[name] if ratio is None else tome_node(models[name], ratio=ratio)
            start = time.perf_counter()
            out = run_dit(model, x, 0.7, ctx, **conds)
            times[(name, ratio)].append(time.perf_counter() - start)
            assert torch.isfinite(out).all()
            print(f"round {r + 1}: {name:12s} {'ToMe %.2f' % ratio if ratio else 'no node':9s} {times[(name, ratio)][-1]:8.2f} s",
                  flush=True)
    rows = []
    for name in loaders:
        plain, merged = statistics.median(times[(name, None)]), statistics.median(times[(name, a.ratio)])
        rows.append({"loader": name, "no_node_s": plain, "tome_s": merged, "speedup": plain / merged,
                     "runs": a.repeats, "all_s": {"no_node": times[(name, None)], "tome": times[(name, a.ratio)]}})
        print(f"{name:12s} no node {plain:8.2f} s  ToMe {a.ratio} {merged:8.2f} s  speed-up {plain / merged:.2f}x")
    if a.json:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(a.json, "w") as f:
            json.dump({"model": "flux1-dev, width 3072, 1 double + 1 single block, random weights", "size": a.size,
                       "text_tokens": a.text, "batch": a.batch, "ratio": a.ratio, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "commit": commit, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
