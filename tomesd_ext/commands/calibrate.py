"""`tomesd-ext calibrate MODEL`: per-block merge ratios within an error budget, measured on the
model's own weights (tomesd_ext/bench/calibrate.py), written as a schedule file.

Example:
    tomesd-ext calibrate sd15 --resolution 512 --steps 4 --out sd15.json --plot sd15.png
    python -c "from tomesd_ext import apply_tome; apply_tome(pipe, schedule='sd15.json')"
MODEL: a built-in name (random weights, sharpened attention, as `tomesd-ext bench`), a diffusers
folder or a single .safetensors file. The budget is --max-error, or (default) the error of a
uniform --match-ratio measured first. Bad input is reported before any work, with exit status 2.
"""

from __future__ import annotations

import os
import sys


def add_parser(subparsers) -> None:
    from .bench import _size

    p = subparsers.add_parser(
        "calibrate",
        help="choose per-block merge ratios within an error budget and write a schedule file",
        description="Search per-block-group ratios for MODEL whose output error stays within a budget (short "
        "sampling runs on its own weights), print a table (setting, speed-up, error), save a plot of error vs "
        "speed-up with the chosen point marked, and write a schedule JSON that apply_tome(schedule=PATH) loads.",
    )
    p.add_argument("model", help="built-in model name, diffusers folder or single .safetensors file")
    p.add_argument("--resolution", type=_size, default=512, help="pixels, e.g. 512 (default 512)")
    p.add_argument("--steps", type=int, default=0, help="sampling steps per measurement; 0 = one denoiser forward (default)")
    p.add_argument("--max-error", type=float, default=None,
                   help="largest relative L2 error of the output allowed (default: that of --match-ratio)")
    p.add_argument("--match-ratio", type=float, default=0.5,
                   help="the uniform ratio measured for comparison; its error is the budget when --max-error is not given")
    p.add_argument("--batch", type=int, default=2, help="images per call; even = classifier-free guidance halves (default 2)")
    p.add_argument("--timestep", type=int, default=500, help="noise level of the input, 0..999 (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="side-by-side timing rounds of baseline, uniform and chosen")
    p.add_argument("--min-tokens", type=int, default=None, help="apply_tome's min_tokens (default: its default)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall: wall-clock seconds; cpu: CPU seconds of this process (waiting for a core on a loaded "
                   "machine does not count; CPU only, best with OMP_NUM_THREADS=1) (default wall)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--out", default="schedule.json", help="schedule JSON to write (default schedule.json)")
    p.add_argument("--plot", default=None, help="PNG of error vs speed-up (default: --out with .png)")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"tomesd-ext calibrate: error: {message}", file=sys.stderr)
    return 2


def _writable(path: str) -> bool:
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.isdir(folder) and os.access(folder, os.W_OK)


def run(args) -> int:
    from ..bench.subject import model_kind

    try:
        model_kind(args.model)
    except ValueError as e:
        return _fail(str(e))
    res = args.resolution
    if any(v % 8 for v in (res if isinstance(res, tuple) else (res,))):
        return _fail(f"--resolution {res}: must be a multiple of 8")
    if args.max_error is not None and not 0.0 < args.max_error <= 1.0:
        return _fail(f"--max-error {args.max_error}: allowed (0, 1]")
    if not 0.0 < args.match_ratio < 1.0:
        return _fail(f"--match-ratio {args.match_ratio}: allowed (0, 1)")
    if args.clock == "cpu" and args.device != "cpu":
        return _fail("--clock cpu measures CPU seconds: use it with --device cpu")
    if args.steps < 0 or args.batch < 1 or args.repeats < 1 or not 0 <= args.timestep <= 999:
        return _fail("--steps >= 0, --batch >= 1, --repeats >= 1 and --timestep in [0, 999] are required")
    plot_path = args.plot or os.path.splitext(args.out)[0] + ".png"
    for path in (args.out, plot_path):
        if not _writable(path):
            return _fail(f"cannot write {path!r}: its folder does not exist or is not writable")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return _fail('the plot needs matplotlib: pip install "tomesd-ext[bench]"')

    from ..bench.calibrate import calibrate, plot, table
    from ..core.schedule import group_spans
    from ..bench.subject import load_subject

    subject = load_subject(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    try:
        cal = calibrate(subject, res, steps=args.steps, budget=args.max_error, uniform_ratio=args.match_ratio,
                        batch=args.batch, seed=args.seed, timestep=args.timestep, repeats=args.repeats,
                        min_tokens=args.min_tokens, clock=args.clock)
    except ValueError as e:  # nothing merges at this size: said after the baseline run
        print(f"tomesd-ext calibrate: error: {e}", file=sys.stderr)
        return 1
    print()
    print(table(cal))
    info = cal.schedule.info
    print(f"\nchosen ratios {info['group_ratios']} for the blocks {group_spans(cal.groups)}: error {info['error']:.4g} "
          f"(budget {cal.budget:.4g}), {info['speedup']:.2f}x vs uniform {args.match_ratio:g} "
          f"{info['uniform_speedup']:.2f}x (side by side, {args.repeats} round(s)); {cal.forwards} runs")
    cal.schedule.save(args.out)
    plot(cal, plot_path, title=f"calibrate {args.model} {res}px, {args.steps} steps")
    print(f"wrote {args.out} (fingerprint {cal.schedule.fingerprint}) and {plot_path}")
    return 0
