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
    p.add_argument("--frames", type=int, default=8, help="frames per clip")
    p.add_argument("--size", type=int, default=256, help="short side in pixels (multiple of 8)")
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


def settings_from_args(args):
    from ..bench.video import VideoBenchSettings

    return VideoBenchSettings(
        model=args.model, clips=[c for c in args.clips.split(",") if c], frames=args.frames, size=args.size,
        steps=args.steps, mode=args.mode, chunk_size=args.chunk_size, seed=args.seed, repeats=args.repeats,
        memory_frames=[int(v) for v in args.memory_frames.split(",") if v], memory_steps=args.memory_steps,
        source_prompt=args.source_prompt, edit_prompt=args.edit_prompt, sharpen=args.sharpen, probe_t=args.probe_t,
    )


def run(args) -> int:
    from ..bench.video import run_video_bench
    from ..bench.video.report import plot, print_table, write_results

    results = run_video_bench(settings_from_args(args))
    print_table(results)
    if args.json:
        write_results(results, args.json)
    if args.plot:
        plot(results, args.plot)
    return 0
