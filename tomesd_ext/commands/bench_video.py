"""`tomesd-ext bench-video`: per-frame editing vs VidToMe on the same clip, seed and settings.

For each clip (the animated GIF scikit-image ships, and a synthetic moving-shapes clip) both
methods edit from one shared (cached) DDIM inversion; measured per method: warp error of the
output along the input's optical flow, generation time per frame (median of --repeats,
methods interleaved A/B/A/B), peak RSS increase of the generation, and the frame-to-frame change
of the guided noise prediction at every step (the mechanism VidToMe acts on: matched tokens share
attention outputs). --memory-frames adds a peak memory check at several video lengths (chunked
UNet calls: flat in the length).

--sharpen (default auto: 2.0 for built-in random-weight models, off for local checkpoints) builds
the model with sharpened self-attention (tomesd_ext.models.sharpen_self_attention): plain random
weights give almost uniform attention, whose output hardly depends on which tokens are merged
(docs/video.md, "Random weights").
"""

from __future__ import annotations

import json
import statistics
import sys
import time


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


def _clip(spec, n, size):
    from ..video import fit_size, moving_shapes, read_frames

    if spec == "shapes":
        return "shapes (synthetic)", fit_size(moving_shapes(n, size), size)[0], ""
    if spec == "gif":
        import os

        import skimage

        path = os.path.join(os.path.dirname(skimage.__file__), "data", "no_time_for_that_tiny.gif")
        name = "skimage no_time_for_that_tiny.gif"
    else:
        path, name = spec, spec
    clip = read_frames(path, max_frames=n)
    frames, note = fit_size(clip.frames, size)
    return name, frames, note


def _generate(editor, start, timesteps, prompt, settings, on_eps=None):
    from ..video.memory import PeakRSS

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        lat = editor.generate(start, timesteps, prompt, settings, on_eps=on_eps)
        dt = time.perf_counter() - t0
    return lat, dt, mem


def _probe(editor, latents, args, methods) -> dict:
    """Frame change of the guided noise prediction of one step on consistent inputs (every frame
    noised with the same noise to timestep args.probe_t), per method; same chunking as generation."""
    import torch

    from ..video import EditSettings, frame_difference

    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(latents[:1].shape, generator=gen).to(latents).expand_as(latents)
    t = torch.tensor([args.probe_t])
    x = editor.scheduler.add_noise(latents, noise, t)
    out = {"timestep": args.probe_t}
    for m, vt in methods.items():
        got = []
        s = EditSettings(mode=args.mode, steps=args.steps, seed=args.seed, chunk_size=args.chunk_size, vidtome=vt)
        editor.generate(x, t, args.edit_prompt, s, on_eps=lambda i, eps: got.append(frame_difference(eps)))
        out[m] = got[0]
    out["ratio_vidtome_over_perframe"] = out["vidtome"] / out["per-frame"]
    return out


def run(args) -> int:
    import torch

    from ..video import EditSettings, VideoEditor, frame_difference, warp_error
    from ..video.models import load_pipeline, model_id, resolve_sharpen

    sharpen = resolve_sharpen(args.model, args.sharpen)
    torch.manual_seed(0)
    pipe = load_pipeline(args.model, sharpen=sharpen)
    editor = VideoEditor(pipe, model_id=model_id(args.model, sharpen))
    results = {"model": args.model, "sharpen": sharpen, "size": args.size, "steps": args.steps, "mode": args.mode,
               "chunk_size": args.chunk_size, "seed": args.seed, "threads": torch.get_num_threads(),
               "memory_measure": "peak process RSS increase during generation (psutil, 5 ms sampling)",
               "clips": [], "memory": []}
    methods = {"per-frame": None, "vidtome": {}}
    for spec in [c for c in args.clips.split(",") if c]:
        name, frames, note = _clip(spec, args.frames, args.size)
        print(f"[{name}] {len(frames)} frames {frames[0].shape[1]}x{frames[0].shape[0]} {note}", file=sys.stderr)
        base = EditSettings(mode=args.mode, steps=args.steps, seed=args.seed, chunk_size=args.chunk_size)
        latents = editor.encode(frames, args.chunk_size)
        sched = editor.scheduler
        if args.mode == "invert":
            start = editor.invert(latents, args.source_prompt, args.steps, args.chunk_size)
            sched.set_timesteps(args.steps)
            timesteps = sched.timesteps
        else:
            sched.set_timesteps(args.steps)
            timesteps = sched.timesteps[args.steps - max(1, int(round(0.8 * args.steps))):]
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(args.seed)).to(latents)
            start = sched.add_noise(latents, noise, timesteps[:1])
        row_probe = _probe(editor, latents, args, methods) if args.probe_t >= 0 else None
        times = {m: [] for m in methods}
        mems, outs, eps_diff, merged = {}, {}, {}, {}
        for rep in range(args.repeats):
            order = list(methods) if rep % 2 == 0 else list(methods)[::-1]
            for m in order:
                s = EditSettings(**{**base.__dict__, "vidtome": methods[m]})
                diffs = []
                lat, dt, mem = _generate(editor, start, timesteps, args.edit_prompt, s,
                                         lambda i, eps, d=diffs: d.append(frame_difference(eps)))
                eps_diff[m] = diffs
                merged[m] = {str(k): v for k, v in sorted(editor.last_merged_calls.items(), reverse=True)}
                times[m].append(dt / len(frames))
                mems[m] = max(mems.get(m, 0.0), mem.peak_mb)
                outs[m] = editor.decode(lat, args.chunk_size)
        row = {"clip": name, "frames": len(frames), "size": f"{frames[0].shape[1]}x{frames[0].shape[0]}", "note": note,
               "input_warp_error": warp_error(frames, frames), "methods": {}}
        for m in methods:
            row["methods"][m] = {
                "warp_error": warp_error(outs[m], frames),
                "s_per_frame": statistics.median(times[m]),
                "s_per_frame_all": times[m],
                "peak_rss_mb": mems[m],
                "eps_frame_diff": eps_diff[m],
                "eps_frame_diff_mean": statistics.fmean(eps_diff[m]),
                "merged_attention_calls": merged[m],
            }
        pf, vt = row["methods"]["per-frame"], row["methods"]["vidtome"]
        row["time_ratio_vidtome_over_perframe"] = vt["s_per_frame"] / pf["s_per_frame"]
        row["warp_ratio_vidtome_over_perframe"] = vt["warp_error"] / pf["warp_error"]
        row["eps_diff_ratio_vidtome_over_perframe"] = vt["eps_frame_diff_mean"] / pf["eps_frame_diff_mean"]
        if row_probe is not None:
            row["probe"] = row_probe
            print(f"  probe (t={args.probe_t}, shared noise, one step): eps frame change per-frame "
                  f"{row_probe['per-frame']:.4f}, vidtome {row_probe['vidtome']:.4f}", file=sys.stderr)
        results["clips"].append(row)
        print(f"  VidToMe merged attn1 calls per generation (tokens per frame: calls): {vt['merged_attention_calls']}",
              file=sys.stderr)
        for label, v in (("per-frame", pf), ("vidtome", vt)):
            print(f"  {label + ':':10s} warp {v['warp_error']:.5f}  eps diff {v['eps_frame_diff_mean']:.4f}  "
                  f"{v['s_per_frame']:.3f} s/frame  peak +{v['peak_rss_mb']:.0f} MiB", file=sys.stderr)
    for n in [int(v) for v in args.memory_frames.split(",") if v]:
        for m in methods:
            r = _memory_in_fresh_process(args, n, m)
            results["memory"].append(r)
            print(f"[memory] {n} frames {m}: peak +{r['peak_rss_mb']:.0f} MiB, {r['seconds']:.1f} s", file=sys.stderr)
    _print_table(results)
    if args.json:
        text = json.dumps(results, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    if args.plot:
        _plot(results, args.plot)
    return 0


def _memory_child(params: dict) -> dict:
    """In a fresh process: load, encode, then measure the generation's peak RSS increase."""
    import torch

    from ..video import EditSettings, VideoEditor, moving_shapes
    from ..video.memory import PeakRSS
    from ..video.models import load_pipeline

    torch.set_num_threads(params["threads"])
    editor = VideoEditor(load_pipeline(params["model"], sharpen=params.get("sharpen", 0.0)), model_id=params["model"])
    frames = moving_shapes(params["frames"], params["size"])
    latents = editor.encode(frames, params["chunk_size"])
    sched = editor.scheduler
    sched.set_timesteps(params["steps"])
    timesteps = sched.timesteps[: params["memory_steps"]]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(params["seed"])).to(latents)
    start = sched.add_noise(latents, noise, timesteps[:1])
    s = EditSettings(steps=params["steps"], seed=params["seed"], chunk_size=params["chunk_size"],
                     vidtome=None if params["method"] == "per-frame" else {})
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        editor.generate(start, timesteps, "a watercolor painting", s)
        dt = time.perf_counter() - t0
    return {"frames": params["frames"], "method": params["method"], "peak_rss_mb": mem.peak_mb,
            "cuda_peak_mb": mem.cuda_peak_mb, "seconds": dt, "steps": len(timesteps)}


def _memory_in_fresh_process(args, n, method):
    """Peak memory is measured in a new Python process: freed memory that the allocator keeps
    would otherwise hide the peak of a later run in the same process."""
    import os
    import subprocess

    import torch

    from ..video.models import resolve_sharpen

    params = {"model": args.model, "sharpen": resolve_sharpen(args.model, args.sharpen), "size": args.size, "steps": args.steps, "chunk_size": args.chunk_size,
              "seed": args.seed, "memory_steps": args.memory_steps, "threads": torch.get_num_threads(),
              "frames": n, "method": method}
    code = ("import json, sys; from tomesd_ext.commands.bench_video import _memory_child; "
            "print('RESULT ' + json.dumps(_memory_child(json.loads(sys.argv[1]))))")
    # glibc: serve every allocation >= 128 KiB by mmap (returned to the OS on free), so RSS tracks
    # live tensors instead of heap high-water marks and fragmentation
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(params)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"memory measurement ({n} frames, {method}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _print_table(results):
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


def _plot(results, path):
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
    fig.savefig(path, dpi=110)
