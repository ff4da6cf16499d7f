"""`tomesd-ext bench`: speed, memory and fidelity of merging methods side by side.

Example (the README's main job):
    tomesd-ext bench --model sd15 --resolution 512 --methods tome,tomesd --ratios 0.5
Video transformers (wan-1.3b, ltx, hunyuan-video-depth4; docs/bench.md): one forward on a clip,
    tomesd-ext bench --model wan-1.3b --resolution 480x832 --frames 17 --methods tome,tome-spatial,tome-kv
    tomesd-ext bench --model sd15-animatediff --frames 16 --methods tome,tome-per-frame
Stacks with what users already run, over whole sampling runs (docs/bench.md, "Stacks"):
    tomesd-ext bench --model sd15 --resolution 512 --steps 20 --methods tome,compile,tome+compile --ratios 0.5
    tomesd-ext bench --model flux-depth4 --resolution 1024 --steps 20 --batch 1 --methods tome,fbcache,tome+fbcache
Bad input (unknown model or method, resolution not a multiple of 8, missing or unreadable
checkpoint, an output path that cannot be written) is reported before any work, with exit status 2.
"""

from __future__ import annotations

import sys


def _methods(value: str):
    return [m.strip() for m in value.split(",") if m.strip()]


def _size(value: str):
    """"512" -> 512 (a square image); "480x832" -> (480, 832) (height x width, video transformers)."""
    import argparse

    try:
        if "x" in value:
            h, w = value.split("x")
            return int(h), int(w)
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: use pixels, e.g. 512, or HEIGHTxWIDTH, e.g. 480x832") from None


VIDEO_METHODS = ("tome", "tome-spatial", "tome-kv")  # the default of video transformers
ANIMATEDIFF_METHODS = ("tome", "tome-per-frame")  # the default of AnimateDiff UNets
# --methods when not given, per kind of denoiser: methods that kind takes (image transformers:
# ours with the family's dit_mode, and the two other modes)
DEFAULT_METHODS = {"unet": ("tome", "tomesd"), "dit": ("tome", "tome-attn", "tome-kv"), "video": VIDEO_METHODS,
                   "animatediff": ANIMATEDIFF_METHODS}
_KINDS = {"unet": "a UNet", "dit": "an image diffusion transformer", "video": "a video transformer",
          "animatediff": "an AnimateDiff UNet"}


def _wrong_model(name: str, method, denoiser: str, model: str) -> str:
    """The error of a method that does not take this kind of denoiser, with the ones that do."""
    from ..bench.methods import BASELINE, METHODS

    owner = {("unet",): "a UNet method", ("video",): "a video-transformer method",
             ("animatediff",): "an AnimateDiff method"}.get(method.models, "a diffusion-transformer method")
    choices = ",".join(m for m, v in METHODS.items() if denoiser in v.models and m != BASELINE)
    return f"--methods {name}: {owner}; --model {model} is {_KINDS[denoiser]} (choose from {choices})"


def add_parser(subparsers):
    from ..bench.inputs import INPUT_KINDS
    from ..bench.methods import METHODS
    from ..bench.video_inputs import VIDEO_INPUT_KINDS

    p = subparsers.add_parser(
        "bench",
        help="measure speed, memory and fidelity of merging methods side by side",
        description="Interleaved timing (medians) and fidelity against the unmerged model on the same input.",
    )
    p.add_argument("--model", default="sd15", help="a built-in UNet (tiny|tiny-sd2|tiny-sdxl|sd15|sd21|sdxl) or diffusion transformer (flux-depth4, flux2-depth2, sd35-large-depth2, sd35-medium, pixart-sigma, qwen-image-depth2, z-image-depth2, tiny-flux, ...; docs/bench.md), seeded random weights, or a local diffusers folder / .safetensors file (default: sd15)")
    p.add_argument("--resolution", type=_size, nargs="+", default=None, help="image sizes in px, multiples of 8 (default: 512); video transformers: HEIGHTxWIDTH, multiples of the VAE factor x patch (default: the model's clip, e.g. 480x832 for wan-1.3b)")
    p.add_argument("--frames", type=int, default=None, help="video transformers: pixel frames of the clip, 1 + a multiple of the VAE's temporal factor (Wan, HunyuanVideo 4: 17 -> 5 latent frames; LTX 8) (default: the model's clip); AnimateDiff: frames of the clip, 2 to 32 (default 16)")
    p.add_argument("--batch", type=int, default=None, help="denoiser batch; even = CFG with batch/2 images (default: 2; 1 for the guidance-distilled transformers Flux.1-dev, Flux.2-dev, Z-Image-Turbo)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5], help="merge ratios (default: 0.5)")
    p.add_argument("--methods", type=_methods, default=None, help=f"comma list from {','.join(m for m in METHODS if m != 'baseline')} (baseline is always measured; default: UNets {','.join(DEFAULT_METHODS['unet'])}; image diffusion transformers: {','.join(DEFAULT_METHODS['dit'])}; video transformers: {','.join(VIDEO_METHODS)}; AnimateDiff UNets: {','.join(ANIMATEDIFF_METHODS)})")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration; 0 = time the fidelity pass instead, for long runs (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before measuring (default: 1)")
    p.add_argument("--steps", type=int, default=0, help="0 = one denoiser forward; N = a sampling run of N steps: DDIM for UNets (and PixArt), flow-matching Euler for rectified-flow transformers; CFG when --batch is even (default: 0)")
    p.add_argument("--timestep", type=int, default=500, help="noise level of the inputs: the timestep of --steps 0, the start of --steps N (default: 500)")
    p.add_argument("--inputs", type=_methods, default=None, help=f"comma list from {','.join(INPUT_KINDS)} (default: photo,noise); video transformers: from {','.join(VIDEO_INPUT_KINDS)} (default: pan)")
    p.add_argument("--equal-error", metavar="METHOD:RATIO", help="also print, for every method run at two or more ratios, the ratio at which it reaches the error of METHOD at RATIO (interpolated; e.g. tome-spatial:0.5)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile methods (default: inductor; 'eager' or 'aot_eager' trace with dynamo only, for quick checks of graph breaks and recompiles)")
    p.add_argument("--cache-threshold", type=float, default=0.05, help="FirstBlockCache threshold of fbcache / tome+fbcache (default: 0.05, diffusers' default; the seeded random-weight models change their first block's residual far more per step: docs/bench.md)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall: wall-clock seconds; cpu: CPU seconds of the bench process (a machine loaded by other jobs does not add its waiting; run with OMP_NUM_THREADS=1; CPU device only) (default: wall)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-tokens", type=int, default=None, dest="min_tokens",
                   help="min_tokens of our methods (auto-skip: grids with fewer tokens are not merged); 0 = merge every "
                        "grid, e.g. to exercise merging on tiny models at small sizes (default: the library's default)")
    p.add_argument("--no-sharpen", dest="sharpen", action="store_false", help="measure fidelity on the plain random weights instead of the sharpened-attention variant (built-in models only)")
    p.add_argument("--micro", action="store_true", help="also time the merging operators alone at the first merged level (plan, merge+unmerge per kernel backend, sort vs topk)")
    p.add_argument("--json", help="write results here (rewritten after every row)")
    p.add_argument("--plot", help="PNG of speed-up against fidelity")
    p.add_argument("--images", help="folder for side-by-side grids of decoded results")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=run)
    return p


def validate(args) -> None:
    """Raise ValueError naming the bad argument, before any model is built."""
    from ..bench.equal_error import parse_reference
    from ..bench.inputs import INPUT_KINDS
    from ..bench.methods import BASELINE, get_method
    from ..bench.subject import model_kind
    from ..bench.video_inputs import VIDEO_INPUT_KINDS
    from ..models import get_dit_config, meta_transformer, model_family, too_large

    from .checks import check_checkpoint_file, check_output_file, check_output_folder, plot_path

    kind = model_kind(args.model)
    if kind == "file":
        check_checkpoint_file("--model", args.model)
    motion = kind == "builtin" and model_family(args.model) == "animatediff"
    dit = kind == "builtin" and model_family(args.model) not in ("unet", "animatediff")
    if dit:
        reason = too_large(args.model)
        if reason:
            raise ValueError(f"--model {args.model}: {reason}")
    video = get_dit_config(args.model)["video"] if dit else None
    denoiser = "video" if video else "dit" if dit else "animatediff" if motion else "unet"
    if args.batch is None:  # the real pipeline's batch for one image: CFG doubles it
        args.batch = 2 if not dit or get_dit_config(args.model)["cfg"] else 1
    if video:
        _check_clip(args, video)
    elif motion:
        _check_motion_clip(args)
    else:
        if args.frames is not None:
            raise ValueError(f"--frames {args.frames}: only for video transformers; --model {args.model} is {_KINDS[denoiser]}")
        args.resolution = args.resolution or [512]
        step = 16 if dit else 8  # transformers: 2x2 latent patches
        for res in args.resolution:
            if isinstance(res, tuple):
                raise ValueError(f"--resolution {res[0]}x{res[1]}: HEIGHTxWIDTH is for video transformers; give one number (square images)")
            if res < 64 or res % step:
                raise ValueError(f"--resolution {res}: must be a multiple of {step} and >= 64")
    if args.methods is None:
        args.methods = list(DEFAULT_METHODS[denoiser])
    if not args.methods:
        raise ValueError("--methods is empty")
    for name in args.methods:
        method = get_method(name)
        if denoiser not in method.models:
            raise ValueError(_wrong_model(name, method, denoiser, args.model))
        reason = method.unavailable() or (dit and method.supports(meta_transformer(args.model)))
        if reason:
            raise ValueError(f"--methods {name}: {reason}")
    args.methods = [m for m in dict.fromkeys(args.methods) if m != BASELINE]
    for r in args.ratios:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"--ratios {r}: must be in [0, 1)")
    clips = video or motion
    kinds = VIDEO_INPUT_KINDS if clips else INPUT_KINDS
    args.inputs = args.inputs or (["pan"] if clips else ["photo", "noise"])
    for kind in args.inputs:
        if kind not in kinds:
            raise ValueError(f"--inputs {kind}: choose from {', '.join(kinds)}" + f" ({_KINDS[denoiser]})" * bool(clips))
    if args.equal_error:
        method, ratio = args.equal_error = parse_reference(args.equal_error)
        if method not in args.methods or not any(abs(r - ratio) < 1e-9 for r in args.ratios):
            raise ValueError(f"--equal-error {method}:{ratio:g}: the run must measure it: add {method} to --methods and {ratio:g} to --ratios")
    if args.min_tokens is not None and args.min_tokens < 0:
        raise ValueError(f"--min-tokens {args.min_tokens}: must be >= 0")
    checks = (("--batch", args.batch, 1), ("--repeats", args.repeats, 0), ("--warmup", args.warmup, 0), ("--steps", args.steps, 0), ("--timestep", args.timestep, 1))
    for name, value, lo in checks:
        if value < lo:
            raise ValueError(f"{name} {value}: must be >= {lo}")
    if args.timestep > 999:
        raise ValueError(f"--timestep {args.timestep}: must be <= 999")
    if dit and args.micro:
        raise ValueError("--micro: the operator micro-bench reads UNet levels; not for diffusion transformers")
    if motion and args.micro:
        raise ValueError("--micro: the operator micro-bench reads image UNet levels; not for AnimateDiff UNets")
    if any(get_method(m).build is not None for m in args.methods):
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.compile_backend not in backends:
            raise ValueError(f"--compile-backend {args.compile_backend}: choose from {', '.join(backends)}")
    if args.cache_threshold < 0:
        raise ValueError(f"--cache-threshold {args.cache_threshold}: must be >= 0")
    if args.json:
        check_output_file("--json", args.json)
    if args.plot:
        args.plot = plot_path("--plot", args.plot)
    if args.images:
        check_output_folder("--images", args.images)
    if args.device == "cuda":
        if args.clock == "cpu":
            raise ValueError("--clock cpu times the CPU work of this process: use it with --device cpu")
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available here")


def _check_clip(args, video: dict) -> None:
    """Video transformers: default clip, --frames and --resolution (HEIGHTxWIDTH) against the VAE."""
    from ..models import meta_transformer

    args.frames = video["frames"] if args.frames is None else args.frames
    t = video["temporal"]
    if args.frames < t + 1 or (args.frames - 1) % t:
        raise ValueError(f"--frames {args.frames}: must be 1 + a multiple of {t} (the VAE's temporal factor), >= {t + 1}")
    patch = meta_transformer(args.model).config.patch_size
    step = video["spatial"] * (patch[-1] if isinstance(patch, (list, tuple)) else patch)
    args.resolution = [r if isinstance(r, tuple) else (r, r) for r in args.resolution or [(video["height"], video["width"])]]
    for h, w in args.resolution:
        if min(h, w) < 2 * step or h % step or w % step:
            raise ValueError(f"--resolution {h}x{w}: height and width must be multiples of {step} (VAE x patch) and >= {2 * step}")


def _check_motion_clip(args) -> None:
    """AnimateDiff UNets: --frames (the motion modules' positions: at most 32) and --resolution
    (a number or HEIGHTxWIDTH, multiples of 8); defaults 16 frames at 512x512."""
    from ..models.motion import MOTION_VIDEO

    args.frames = MOTION_VIDEO["frames"] if args.frames is None else args.frames
    if not 2 <= args.frames <= 32:
        raise ValueError(f"--frames {args.frames}: AnimateDiff clips have 2 to 32 frames (the motion modules' positions)")
    args.resolution = [r if isinstance(r, tuple) else (r, r) for r in args.resolution or [(MOTION_VIDEO["height"], MOTION_VIDEO["width"])]]
    for h, w in args.resolution:
        if min(h, w) < 64 or h % 8 or w % 8:
            raise ValueError(f"--resolution {h}x{w}: height and width must be multiples of 8 and >= 64")


def run(args) -> int:
    try:
        validate(args)
    except ValueError as err:
        print(f"tomesd-ext bench: error: {err}", file=sys.stderr)
        return 2
    from ..bench.runner import BenchSettings, run_bench
    from ..bench.subject import load_subject

    settings = BenchSettings(
        resolutions=args.resolution, methods=args.methods, ratios=args.ratios, batch=args.batch,
        repeats=args.repeats, warmup=args.warmup, steps=args.steps, timestep=args.timestep,
        seed=args.seed, inputs=args.inputs, micro=args.micro, equal_error=args.equal_error,
        compile_backend=args.compile_backend, cache_threshold=args.cache_threshold, min_tokens=args.min_tokens,
        clock=args.clock,
    )
    print(f"building {args.model} ({args.dtype}, {args.device}) ...", file=sys.stderr, flush=True)
    subject = load_subject(args.model, args.device, args.dtype, args.seed, args.sharpen, args.frames)
    result = run_bench(subject, settings, json_path=args.json, progress=args.progress)
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        from ..bench.plot import plot_tradeoff

        print(f"wrote {plot_tradeoff(result.document['rows'], args.plot, title=f'{args.model}, batch {args.batch}, steps {args.steps}')}")
    if args.images:
        from ..bench.grid import save_grids

        for path in save_grids(result.images, args.images):
            print(f"wrote {path}")
    return 0
