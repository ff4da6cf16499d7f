"""The video bench's measurement loop: per clip, both methods edit from one shared DDIM inversion.

Per method: warp error of the output along the input's optical flow, generation time per frame
(median of `repeats`, methods interleaved A/B, B/A), peak RSS increase of the generation, the
frame-to-frame change of the guided noise prediction at every step, and VidToMe's merged
attention calls; optionally the one-step probe (probe.py) and the peak-memory check at several
video lengths (fresh_memory.py).
"""

from __future__ import annotations

import statistics
import sys
from typing import Callable

from ..memory import PeakMemory
from ..timing import round_order, timed
from .settings import METHODS, VideoBenchSettings

# the video bench samples RSS every 5 ms after a garbage collection (docs/video.md)
RSS_INTERVAL = 0.005


def generate_measured(editor, start, timesteps, prompt, edit_settings, on_eps=None):
    """One generation under the memory meter: (latents (F, 4, h, w), seconds, PeakMemory)."""
    with PeakMemory("cpu", interval=RSS_INTERVAL, collect=True) as mem:
        lat, seconds = timed(lambda: editor.generate(start, timesteps, prompt, edit_settings, on_eps=on_eps))
    return lat, seconds, mem


def _start_latents(editor, latents, s: VideoBenchSettings):
    """(start latents (F, 4, h, w), timesteps) of the generation: the DDIM inversion (invert) or
    the clip noised to 80 % of the schedule (sdedit)."""
    import torch

    sched = editor.scheduler
    if s.mode == "invert":
        start = editor.invert(latents, s.source_prompt, s.steps, s.chunk_size)
        sched.set_timesteps(s.steps)
        return start, sched.timesteps
    sched.set_timesteps(s.steps)
    timesteps = sched.timesteps[s.steps - max(1, int(round(0.8 * s.steps))):]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(s.seed)).to(latents)
    return sched.add_noise(latents, noise, timesteps[:1]), timesteps


def measure_clip(editor, name: str, frames, note: str, s: VideoBenchSettings, log: Callable[[str], None]) -> dict:
    """The result row of one clip; frames: list of (H, W, 3) uint8 arrays."""
    from ...video import frame_difference, warp_error
    from .probe import probe

    latents = editor.encode(frames, s.chunk_size)
    start, timesteps = _start_latents(editor, latents, s)
    row_probe = probe(editor, latents, s) if s.probe_t >= 0 else None
    times = {m: [] for m in METHODS}
    mems, outs, eps_diff, merged = {}, {}, {}, {}
    for rep in range(s.repeats):
        for m in round_order(METHODS, rep, "reverse"):
            diffs = []
            lat, dt, mem = generate_measured(editor, start, timesteps, s.edit_prompt, s.edit_settings(m),
                                             lambda i, eps, d=diffs: d.append(frame_difference(eps)))
            eps_diff[m] = diffs
            merged[m] = {str(k): v for k, v in sorted(editor.last_merged_calls.items(), reverse=True)}
            times[m].append(dt / len(frames))
            mems[m] = max(mems.get(m, 0.0), mem.rss_mb)
            outs[m] = editor.decode(lat, s.chunk_size)
    row = {"clip": name, "frames": len(frames), "size": f"{frames[0].shape[1]}x{frames[0].shape[0]}", "note": note,
           "input_warp_error": warp_error(frames, frames), "methods": {}}
    for m in METHODS:
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
        log(f"  probe (t={s.probe_t}, shared noise, one step): eps frame change per-frame "
            f"{row_probe['per-frame']:.4f}, vidtome {row_probe['vidtome']:.4f}")
    log(f"  VidToMe merged attn1 calls per generation (tokens per frame: calls): {vt['merged_attention_calls']}")
    for label, v in (("per-frame", pf), ("vidtome", vt)):
        log(f"  {label + ':':10s} warp {v['warp_error']:.5f}  eps diff {v['eps_frame_diff_mean']:.4f}  "
            f"{v['s_per_frame']:.3f} s/frame  peak +{v['peak_rss_mb']:.0f} MiB")
    return row


def run_video_bench(s: VideoBenchSettings, log: Callable[[str], None] = lambda text: print(text, file=sys.stderr)) -> dict:
    """Measure every clip, then the memory check; returns the results document (docs/video.md)."""
    import torch

    from ...video import VideoEditor
    from ...video.models import load_pipeline, model_id, resolve_sharpen
    from .clips import load_clip
    from .fresh_memory import memory_in_fresh_process

    sharpen = resolve_sharpen(s.model, s.sharpen)
    torch.manual_seed(0)
    editor = VideoEditor(load_pipeline(s.model, sharpen=sharpen), model_id=model_id(s.model, sharpen))
    results = {"model": s.model, "sharpen": sharpen, "size": s.size, "steps": s.steps, "mode": s.mode,
               "chunk_size": s.chunk_size, "seed": s.seed, "threads": torch.get_num_threads(),
               "memory_measure": "peak process RSS increase during generation (psutil, 5 ms sampling)",
               "clips": [], "memory": []}
    for spec in s.clips:
        name, frames, note = load_clip(spec, s.frames, s.size)
        log(f"[{name}] {len(frames)} frames {frames[0].shape[1]}x{frames[0].shape[0]} {note}")
        results["clips"].append(measure_clip(editor, name, frames, note, s, log))
    for n in s.memory_frames:
        for m in METHODS:
            r = memory_in_fresh_process(s, sharpen, n, m)
            results["memory"].append(r)
            log(f"[memory] {n} frames {m}: peak +{r['peak_rss_mb']:.0f} MiB, {r['seconds']:.1f} s")
    return results
