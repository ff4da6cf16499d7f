"""`tomesd-ext demo`: generate with and without token merging on a built-in model; print times."""

from __future__ import annotations

import statistics
import time


def add_parser(sub):
    p = sub.add_parser("demo", help="generate with and without ToMe on a random-weight built-in model")
    p.add_argument("--model", default="sd15", help="built-in architecture (tiny, sd15, sd21, sdxl); default sd15")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels (multiple of 8)")
    p.add_argument("--steps", type=int, default=3, help="sampling steps with CFG")
    p.add_argument("--ratio", type=float, default=0.5, help="ToMe ratio")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each setting")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from ..diffusers import apply_tome, remove_tome
    from ..models import MODEL_NAMES, build_pipeline

    if args.model not in MODEL_NAMES:
        raise SystemExit(f"--model {args.model!r} is not a built-in model: choose one of {', '.join(MODEL_NAMES)}")
    if args.resolution % 8 or args.resolution <= 0:
        raise SystemExit(f"--resolution {args.resolution} must be a positive multiple of 8")
    print(f"building {args.model} (random weights, real architecture)...")
    pipe = build_pipeline(args.model, "txt2img", seed=args.seed)

    def generate():
        start = time.perf_counter()
        with torch.no_grad():
            latents = pipe(
                "a photo of an astronaut riding a horse",
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                output_type="latent",
                generator=torch.Generator().manual_seed(args.seed),
            ).images
        return time.perf_counter() - start, latents

    times = {"baseline": [], f"tome {args.ratio}": []}
    outputs = {}
    runs = [(name, r) for r in range(args.repeats + 1) for name in times]  # first round = warm-up
    for name, r in tqdm(runs, desc="generating (A/B interleaved)"):
        if name == "baseline":
            remove_tome(pipe)
        else:
            apply_tome(pipe, args.ratio, seed=args.seed)
        seconds, outputs[name] = generate()
        if r > 0:
            times[name].append(seconds)
    remove_tome(pipe)
    base = statistics.median(times["baseline"])
    print(f"\n{args.model} {args.resolution}px, {args.steps} steps, CFG batch 2, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, ts in times.items():
        med = statistics.median(ts)
        err = float((outputs[name] - outputs["baseline"]).norm() / outputs["baseline"].norm())
        print(f"  {name:<12} median {med:7.2f}s  speed-up {base / med:5.2f}x  latent rel. error {err:.4f}")
    return 0
