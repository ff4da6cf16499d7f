#!/usr/bin/env python
"""Side-by-side UNet bench: baseline vs tomesd vs ours (torch / CUDA kernels, plan reuse).

One denoiser call = one UNet forward on a (batch, 4, H/8, W/8) latent (batch 2 = a CFG pair).
Methods run interleaved, round by round (A/B/C/A/B/C...), and each round patches the model,
makes `--calls` calls at decreasing timesteps (so reuse_steps=2 reuses on every other call),
and unpatches; the median per-call time over rounds is reported. Fidelity: rel. L2 error of the
conditional half of the noise prediction at t=500 against the unpatched model on the same input,
on the "sharpened attention" variant (docs/bench.md, "Sharpened attention"), with a smooth ("photo-like")
latent noised to t=500. --micro adds a kernel micro-bench (matching + merge + unmerge, sort vs
topk) at the shapes of the merged level.

Examples:
  flock /tmp/tomesd_heavy.lock python scripts/tome_bench.py --model sd15 --sizes 512 \
      --methods baseline,ours,ours-level,ours-level-k2 --batch 1 --rounds 2
  python scripts/tome_bench.py --device cuda --dtype fp16 --model sd15 --sizes 512,1024,2048 \
      --methods baseline,tomesd,ours-torch,ours-cuda,ours-level --micro --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tomesd_ext import kernels  # noqa: E402
from tomesd_ext.diffusers import apply_tome, remove_tome  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ALL_METHODS = ("baseline", "tomesd", "ours", "ours-torch", "ours-cuda", "ours-level", "ours-level-k2")


# ------------------------------------------------------------------ model and inputs


def build_unet(name: str, dtype, device):
    """Random-weight UNet of the real architecture, self-attention sharpened (fidelity variant)."""
    from tomesd_ext.models import build_unet as build, sharpen_self_attention

    unet = build(name, seed=0, dtype=torch.float32, device="cpu")
    sharpen_self_attention(unet)
    return unet.to(device, dtype).eval()


def alphas_cumprod():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def make_inputs(unet, size: int, batch: int, dtype, device, seed=0):
    """Latent (smooth field noised to t=500), text embeddings and SDXL's added conditions."""
    g = torch.Generator().manual_seed(seed)
    lat = size // 8
    x0 = torch.nn.functional.interpolate(torch.randn(1, 4, lat // 8, lat // 8, generator=g), size=(lat, lat), mode="bicubic")
    x0 = x0 / x0.std()
    a = alphas_cumprod()[500].item()
    xt = a**0.5 * x0 + (1 - a) ** 0.5 * torch.randn(1, 4, lat, lat, generator=g)
    cfg = unet.config
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32).to(device, dtype),
        }
    return xt.repeat(batch, 1, 1, 1).to(device, dtype), ctx.to(device, dtype), kwargs


# ------------------------------------------------------------------ methods


def set_kernels(mode: str):
    os.environ["TOMESD_EXT_KERNELS"] = mode
    kernels.reset()


def patch(unet, method: str, ratio: float):
    """Apply `method` to unet; returns the undo function."""
    if method == "baseline":
        return lambda: None
    if method == "tomesd":
        import tomesd

        tomesd.apply_patch(unet, ratio=ratio)
        return lambda: tomesd.remove_patch(unet)
    kernel_mode = {"ours-torch": "torch", "ours-cuda": "cuda"}.get(method, "auto")
    set_kernels(kernel_mode)
    reuse = "level" if method.startswith("ours-level") else "block"
    steps = 2 if method.endswith("-k2") else 1
    apply_tome(unet, ratio=ratio, seed=0, reuse=reuse, reuse_steps=steps)
    return lambda: remove_tome(unet)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class count_plans:
    """Count the merge plans computed (tomesd_ext.diffusers.state.tome_plan calls) in a with-block."""

    def __enter__(self):
        from tomesd_ext.diffusers import state

        self.state, self.real, self.count = state, state.tome_plan, [0]

        def counting(*a, **k):
            self.count[0] += 1
            return self.real(*a, **k)

        state.tome_plan = counting
        return self.count

    def __exit__(self, *exc):
        self.state.tome_plan = self.real


def call(unet, x, t, ctx, kwargs):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx, **kwargs).sample


def run_size(unet, size, args, device, dtype):
    x, ctx, kwargs = make_inputs(unet, size, args.batch, dtype, device)
    timesteps = [500 - 20 * i for i in range(args.calls)]
    ref = call(unet, x, 500, ctx, kwargs).float()
    half = max(1, args.batch // 2)
    results = {m: {"times": [], "peak_mib": None, "rel_err": None, "error": None} for m in args.methods}

    # fidelity: fresh patch, calls at t=520 then t=500 (reuse_steps=2 then reuses the t=520 plan)
    for m in args.methods:
        if m == "baseline":
            results[m]["rel_err"] = 0.0
            continue
        try:
            undo = patch(unet, m, args.ratio)
            try:
                call(unet, x, 520, ctx, kwargs)
                with count_plans() as counter:
                    out = call(unet, x, 500, ctx, kwargs).float()
            finally:
                undo()
            if m.startswith("ours"):
                results[m]["plans_per_call"] = counter[0]
            err = (out[:half] - ref[:half]).norm() / ref[:half].norm()
            results[m]["rel_err"] = float(err)
        except Exception as exc:  # a method that cannot run here (e.g. tomesd vs this diffusers)
            results[m]["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    live = [m for m in args.methods if results[m]["error"] is None]

    for _ in range(args.warmup):
        for m in live:
            undo = patch(unet, m, args.ratio)
            call(unet, x, 500, ctx, kwargs)
            undo()
    for r in range(args.rounds):
        for m in live:
            undo = patch(unet, m, args.ratio)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            for t in timesteps:
                call(unet, x, t, ctx, kwargs)
            sync(device)
            results[m]["times"].append((time.perf_counter() - start) / len(timesteps))
            if device.startswith("cuda"):
                peak = torch.cuda.max_memory_allocated() / 2**20
                results[m]["peak_mib"] = max(results[m]["peak_mib"] or 0.0, peak)
            undo()
        if args.progress:
            print(f"  {size}px round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    base = results.get("baseline")
    base_t = statistics.median(base["times"]) if base and base["times"] else None
    for m in live:
        med = statistics.median(results[m]["times"])
        results[m]["median_s"] = med
        results[m]["speedup_vs_baseline"] = base_t / med if base_t else None
    return results


# ------------------------------------------------------------------ kernel micro-bench


def timed(fn, device, reps=20):
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def micro(size, args, device, dtype, channels):
    """Matching + merge + unmerge at the merged level of a size x size image, torch vs CUDA kernels."""
    from tomesd_ext.core import ToMeOptions, merge, tome_plan, unmerge

    h = w = size // 8
    x = torch.randn(args.batch, h * w, channels, device=device, dtype=dtype)
    opts = ToMeOptions.create(ratio=args.ratio, seed=0)
    out = {}
    modes = ["torch"] + (["cuda"] if device.startswith("cuda") else [])
    for mode in modes:
        set_kernels(mode)
        try:
            plan = tome_plan(x, h, w, opts, seed=1)
            out[f"plan_ms_{mode}"] = 1e3 * timed(lambda: tome_plan(x, h, w, opts, seed=1), device)
            out[f"merge_unmerge_ms_{mode}"] = 1e3 * timed(lambda: unmerge(merge(x, plan), plan), device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
                tome_plan(x, h, w, opts, seed=1)
                out[f"plan_extra_mib_{mode}"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        except Exception as exc:
            out[f"error_{mode}"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    S = h * w - (h // 2) * (w // 2)
    r = min(int(args.ratio * h * w), S)
    score = torch.rand(args.batch, S, device=device)
    out["sort_ms"] = 1e3 * timed(lambda: torch.sort(score, dim=-1, descending=True, stable=True), device)
    out["topk_unsorted_ms"] = 1e3 * timed(lambda: torch.topk(score, r, dim=-1, sorted=False), device)
    set_kernels("auto")
    return out


# ------------------------------------------------------------------ main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", help="sd15 | sd21 | sdxl")
    p.add_argument("--sizes", default="512", help="image sizes in px, comma-separated")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--methods", default="baseline,ours,ours-level")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--calls", type=int, default=2, help="denoiser calls per round (decreasing t)")
    p.add_argument("--micro", action="store_true", help="also time matching/merge/unmerge alone")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {ALL_METHODS}")
    dtype = DTYPES[args.dtype]
    unet = build_unet(args.model, dtype, args.device)
    report = {
        "model": args.model,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "batch": args.batch,
        "ratio": args.ratio,
        "torch": torch.__version__,
        "sizes": {},
    }
    channels = unet.config.block_out_channels[0 if args.model != "sdxl" else 1]
    for size in [int(s) for s in args.sizes.split(",")]:
        res = run_size(unet, size, args, args.device, dtype)
        entry = {"methods": res}
        if args.micro:
            entry["micro"] = mic = micro(size, args, args.device, dtype, channels)
            # matching + merge + unmerge per call = plans x (plan + merge/unmerge), per kernel path
            n = res.get("ours", res.get("ours-torch", res.get("ours-cuda", {}))).get("plans_per_call")
            for mode, method in (("torch", "ours-torch"), ("cuda", "ours-cuda")):
                r = res.get(method) or res.get("ours")
                if n and r and r.get("median_s") and f"plan_ms_{mode}" in mic:
                    overhead = n * (mic[f"plan_ms_{mode}"] + mic[f"merge_unmerge_ms_{mode}"])
                    mic[f"overhead_ms_per_call_{mode}"] = overhead
                    mic[f"overhead_share_{mode}"] = overhead / (1e3 * r["median_s"])
        report["sizes"][str(size)] = entry
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"\n{args.model} {size}px {args.dtype} batch {args.batch} ratio {args.ratio} on {report['device']}")
        print(f"{'method':<15} {'median s/call':>13} {'speed-up':>9} {'peak MiB':>9} {'rel.err':>8}")
        for m, r in res.items():
            if r["error"]:
                print(f"{m:<15} ERROR {r['error']}")
                continue
            sp = f"{r['speedup_vs_baseline']:.3f}" if r.get("speedup_vs_baseline") else "-"
            pk = f"{r['peak_mib']:.0f}" if r["peak_mib"] else "-"
            print(f"{m:<15} {r['median_s']:>13.4f} {sp:>9} {pk:>9} {r['rel_err']:>8.4f}")
        if args.micro:
            print("micro:", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry["micro"].items()}))
        sys.stdout.flush()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
