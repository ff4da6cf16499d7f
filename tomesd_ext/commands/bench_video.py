"""`tomesd-ext bench-video`: per-frame editing vs VidToMe on the same clip, seed and settings.

For each clip (the animated GIF scikit-image ships, and a synthetic moving-shapes clip) both
methods edit from one shared (cached) DDIM inversion; the measurement is
tomesd_ext.bench.video (warp error, time per frame, peak RSS increase, the frame-to-frame change
of the guided noise prediction). --memory-frames adds a peak memory check at several video
lengths (chunked UNet calls: flat in the length).

--sharpen (default auto: 2.0 for built-in random-weight models, off for local checkpoints) builds
the model with sharpened self-attention (tomesd_ext.models.sharpen_self_attention): plain random
weights give almost uniform attention, whose output hardly depends on which tokens are merged.
"""

from __future__ import annotations


def add_parser(subparsers):
    p = subparsers.add_parser("bench-video", help="per-frame editing vs VidToMe: warp error, time, memory")
    p.add_argument("--model", default="tiny", help="built-in model name (tiny, sd15, ...) or local checkpoint")
    p.add_argument("--clips", default="gif,shapes", help="comma list of: gif (skimage's animated GIF), shapes, or paths")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (>= 2)")
    p.add_argument("--size", type=int, default=256, help="short side in pixels (a multiple of 8, >= 32)")
    p.add_argument("--steps", type=int, default=6, help="DDIM steps (inversion and generation)")
    p.add_argument("--mode", default="invert", choices=("invert", "sdedit"))
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed generations per method (interleaved)")
    p.add_argument("--memory-frames", default="", help="e.g. 8,32: peak-memory check of VidToMe at these lengths")
    p.add_argument("--memory-steps", type=int, default=1, help="generation steps of the memory check")
    p.add_argument("--source-prompt", default="a video")
    p.add_argument("--edit-prompt", default="a watercolor painting")
    p.add_argument("--sharpen", default="auto",
                   help="self-attention sharpening scale: auto (2.0 for built-in random-weight models, "
                        "off for local checkpoints) or a number (0 = plain attention)")
    p.add_argument("--probe-t", type=int, default=251, metavar="T",
                   help="one-call probe: the clip's latents noised to timestep T with ONE noise shared by all "
                        "frames, one guided UNet step per method; reports the noise prediction's frame change "
                        "(the mechanism, free of the DDIM chain); -1 = off")
    p.add_argument("--json", metavar="PATH", help="write results as JSON ('-' = stdout)")
    p.add_argument("--plot", metavar="PNG", help="bar charts of warp error and time per frame")
    p.set_defaults(run=run)
    return p


def _check_model(model: str) -> None:
    from pathlib import Path

    from ..models import UNET_NAMES
    from .checks import check_checkpoint_file

    from ..models.video_configs import VIDEO_NAMES

    if model in VIDEO_NAMES:  # one transformer forward, measured by the image bench's runner
        raise ValueError(f"--model {model!r} is a video transformer: measure it with `tomesd-ext bench --model {model} "
                         "--frames N --resolution HxW` (docs/bench.md, \"Video transformers\"); bench-video edits clips with SD1.x/2.x")
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        check_checkpoint_file("--model", str(p))
    elif not p.exists() and (model not in UNET_NAMES or model.endswith("sdxl")):
        names = ", ".join(n for n in UNET_NAMES if not n.endswith("sdxl"))
        raise ValueError(f"--model {model!r} is neither a local path nor a built-in SD1.x/2.x model ({names})")


def _check_clip(spec: str) -> None:
    from ..video import VideoInputError, read_frames

    if spec in ("gif", "shapes"):
        return
    try:
        read_frames(spec, max_frames=1)
    except VideoInputError as err:
        raise ValueError(f"--clips {spec!r}: {err}") from err


def settings_from_args(args):
    """The VideoBenchSettings of the command line; ValueError naming the option, before any model loads."""
    from ..bench.video import VideoBenchSettings
    from ..video.models import resolve_sharpen
    from ..core.options import OptionError
    from .checks import check_output_file, plot_path

    clips = [c for c in args.clips.split(",") if c]
    if not clips:
        raise ValueError("--clips is empty: use gif, shapes or paths")
    try:
        memory_frames = [int(v) for v in args.memory_frames.split(",") if v]
    except ValueError:
        raise ValueError(f"--memory-frames {args.memory_frames!r}: use a comma list of ints, e.g. 8,32") from None
    if args.size < 32 or args.size % 8:
        raise ValueError(f"--size {args.size}: must be a multiple of 8 and >= 32")
    ranges = (("--frames", args.frames, 2, 10000), ("--steps", args.steps, 1, 1000), ("--chunk-size", args.chunk_size, 1, 64),
              ("--seed", args.seed, 0, 2**63 - 1), ("--repeats", args.repeats, 1, 1000),
              ("--memory-steps", args.memory_steps, 1, args.steps), ("--probe-t", args.probe_t, -1, 999),
              *(("--memory-frames", n, 2, 10000) for n in memory_frames))
    for flag, value, lo, hi in ranges:
        if not lo <= value <= hi:
            raise ValueError(f"{flag} {value}: must be in [{lo}, {hi}]")
    _check_model(args.model)
    try:
        resolve_sharpen(args.model, args.sharpen)
    except OptionError as err:
        raise ValueError(f"--sharpen {args.sharpen!r}: {err}") from None
    for spec in clips:
        _check_clip(spec)
    if args.json:
        check_output_file("--json", args.json, stdout_ok=True)
    if args.plot:
        args.plot = plot_path("--plot", args.plot)
    return VideoBenchSettings(
        model=args.model, clips=clips, frames=args.frames, size=args.size,
        steps=args.steps, mode=args.mode, chunk_size=args.chunk_size, seed=args.seed, repeats=args.repeats,
        memory_frames=memory_frames, memory_steps=args.memory_steps,
        source_prompt=args.source_prompt, edit_prompt=args.edit_prompt, sharpen=args.sharpen, probe_t=args.probe_t,
    )


def run(args) -> int:
    import sys

    from ..bench.video import run_video_bench
    from ..bench.video.report import plot, print_table, write_results

    try:
        settings = settings_from_args(args)
    except ValueError as err:
        print(f"tomesd-ext bench-video: error: {err}", file=sys.stderr)
        return 2
    results = run_video_bench(settings)
    print_table(results)
    if args.json:
        write_results(results, args.json)
    if args.plot:
        plot(results, args.plot)
    return 0
