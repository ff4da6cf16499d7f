"""Peak memory of VidToMe / per-frame generation at one video length, in a fresh process.

A new Python process per measurement: freed memory that the allocator keeps would otherwise
hide the peak of a later run in the same process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..memory import PeakMemory
from ..timing import timed


def measure_child(params: dict) -> dict:
    """In the fresh process: load, encode moving shapes, then measure the generation's peak RSS
    increase over params["memory_steps"] steps (chunked UNet calls: flat in the length)."""
    import torch

    from ...video import EditSettings, VideoEditor, moving_shapes
    from ...video.models import load_pipeline
    from .measure import RSS_INTERVAL

    torch.set_num_threads(params["threads"])
    editor = VideoEditor(load_pipeline(params["model"], sharpen=params.get("sharpen", 0.0)), model_id=params["model"])
    latents = editor.encode(moving_shapes(params["frames"], params["size"]), params["chunk_size"])
    sched = editor.scheduler
    sched.set_timesteps(params["steps"])
    timesteps = sched.timesteps[: params["memory_steps"]]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(params["seed"])).to(latents)
    start = sched.add_noise(latents, noise, timesteps[:1])
    s = EditSettings(steps=params["steps"], seed=params["seed"], chunk_size=params["chunk_size"],
                     vidtome=None if params["method"] == "per-frame" else {})
    with PeakMemory("cpu", interval=RSS_INTERVAL, collect=True) as mem:
        _, seconds = timed(lambda: editor.generate(start, timesteps, "a watercolor painting", s))
    return {"frames": params["frames"], "method": params["method"], "peak_rss_mb": mem.rss_mb,
            "cuda_peak_mb": mem.cuda_mb, "seconds": seconds, "steps": len(timesteps)}


def memory_in_fresh_process(settings, sharpen: float, frames: int, method: str) -> dict:
    """measure_child in a new interpreter for `frames` frames of `method` (per-frame | vidtome)."""
    import torch

    params = {"model": settings.model, "sharpen": sharpen, "size": settings.size, "steps": settings.steps,
              "chunk_size": settings.chunk_size, "seed": settings.seed, "memory_steps": settings.memory_steps,
              "threads": torch.get_num_threads(), "frames": frames, "method": method}
    code = ("import json, sys; from tomesd_ext.bench.video.fresh_memory import measure_child; "
            "print('RESULT ' + json.dumps(measure_child(json.loads(sys.argv[1]))))")
    # glibc: serve every allocation >= 128 KiB by mmap (returned to the OS on free), so RSS tracks
    # live tensors instead of heap high-water marks and fragmentation
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(params)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"memory measurement ({frames} frames, {method}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])
