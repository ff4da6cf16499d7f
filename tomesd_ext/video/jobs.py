"""Batch video editing jobs (tomesd-ext edit-video JOBS.yaml).

JOBS.yaml holds `jobs:` (a list of mappings) and optional `defaults:` merged under every job.
Each finished job writes OUTPUT/output.mp4, OUTPUT/frames/NNNN.png and OUTPUT/job.json into a
temporary folder that is renamed into place at the end (atomic); a rerun skips jobs whose
job.json exists; a failing job is reported and the others still run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..core.options import OptionError
from .editor import EditSettings, VideoEditor
from .io import fit_size, read_frames, write_frames, write_mp4
from .models import model_id, resolve_sharpen
from .warp import warp_error

REQUIRED = ("input", "output", "edit_prompt")
FIELDS = {
    "name": "job name (default: the output folder's name)",
    "input": "mp4/gif file or folder of frames",
    "output": "output folder (gets output.mp4, frames/, job.json)",
    "source_prompt": "prompt describing the input (needed by mode invert)",
    "edit_prompt": "prompt of the edit",
    "mode": "invert (DDIM inversion) or sdedit (partial strength)",
    "strength": "sdedit strength in (0, 1]",
    "frames": "{start, end, stride, max}",
    "size": "short side (int) or [width, height]; rounded to a multiple of 8",
    "steps": "DDIM steps",
    "guidance": "CFG scale",
    "negative_prompt": "negative prompt",
    "seed": "seed of merging and noise",
    "model": "built-in name (tiny, sd15, sd21) or local checkpoint path",
    "sharpen": "self-attention sharpening of the model: auto (2.0 for built-in random weights, off for checkpoints) or a scale (0 = off)",
    "control": "none or canny",
    "controlnet": "local ControlNet folder (default: built-in random one for built-in models)",
    "control_scale": "ControlNet conditioning scale",
    "vidtome": "false (per-frame editing) or VidToMe options {local_ratio, global_ratio, max_downsample, ...}",
    "chunk_size": "frames per UNet call",
    "fps": "output frame rate (default: the input's)",
    "cache_dir": "folder of cached inversions",
}
DEFAULT_CACHE = "~/.cache/tomesd-ext/inversions"


class JobError(ValueError):
    """A job's description is invalid; the message names the job and the field."""


@dataclass
class Job:
    index: int
    name: str
    spec: Dict[str, Any]
    settings: EditSettings
    output: Path


@dataclass
class JobResult:
    name: str
    status: str  # done | skipped | failed
    frames: int = 0
    size: str = ""
    seconds: float = 0.0
    warp_error: float = float("nan")
    output: str = ""
    message: str = ""
    timings: Dict[str, float] = field(default_factory=dict)


def load_jobs_file(path) -> tuple:
    """(list of raw job mappings merged over defaults, base folder of relative paths)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise JobError(f"cannot read jobs file {str(p)!r}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise JobError(f"jobs file {str(p)!r} is not valid YAML: {e}") from e
    if isinstance(data, list):
        data = {"jobs": data}
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise JobError(f"jobs file {str(p)!r} must hold a list `jobs:` (optionally `defaults:`)")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise JobError("`defaults:` must be a mapping")
    raw = []
    for item in data["jobs"]:
        raw.append({**defaults, **item} if isinstance(item, dict) else item)
    return raw, p.resolve().parent


def parse_job(index: int, raw, base: Path) -> Job:
    """Validate one job mapping; raises JobError naming the job and the problem."""
    label = f"job {index + 1}"
    if not isinstance(raw, dict):
        raise JobError(f"{label}: must be a mapping, got {type(raw).__name__}")
    if raw.get("name"):
        label = f"job {index + 1} ({raw['name']})"
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise JobError(f"{label}: unknown field(s) {unknown}; allowed: {', '.join(FIELDS)}")
    missing = [k for k in REQUIRED if not raw.get(k)]
    mode = raw.get("mode", "invert")
    if mode == "invert" and not raw.get("source_prompt"):
        missing.append("source_prompt")
    if missing:
        raise JobError(f"{label}: missing required field(s) {missing}")
    vt = raw.get("vidtome", {})
    if vt is True or vt is None:
        vt = {}
    if vt is False:
        vt = None
    if vt is not None and not isinstance(vt, dict):
        raise JobError(f"{label}: vidtome must be false or a mapping of options, got {vt!r}")
    if vt and "chunk_size" in vt:
        raise JobError(f"{label}: set chunk_size on the job, not inside vidtome")
    control = raw.get("control")
    control = None if control in (None, False, "none") else control
    try:
        s = EditSettings(
            mode=mode,
            steps=raw.get("steps", 8),
            guidance=raw.get("guidance", 7.5),
            strength=raw.get("strength", 0.8),
            seed=raw.get("seed", 0),
            negative_prompt=raw.get("negative_prompt", "ugly, blurry, low res"),
            chunk_size=raw.get("chunk_size", 4),
            vidtome=vt,
            control=control,
            control_scale=raw.get("control_scale", 1.0),
        ).check()
    except (OptionError, TypeError) as e:
        raise JobError(f"{label}: {e}") from e
    try:
        sharpen = resolve_sharpen(str(raw.get("model", "tiny")), raw.get("sharpen", "auto"))
    except OptionError as e:
        raise JobError(f"{label}: {e}") from e
    frames = raw.get("frames") or {}
    if not isinstance(frames, dict) or set(frames) - {"start", "end", "stride", "max"}:
        raise JobError(f"{label}: frames must be a mapping of start, end, stride, max; got {frames!r}")
    size = raw.get("size")
    if size is not None and not (
        (isinstance(size, int) and size >= 8)
        or (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v >= 8 for v in size))
    ):
        raise JobError(f"{label}: size must be an int >= 8 or [width, height], got {size!r}")
    out = Path(str(raw["output"])).expanduser()
    out = out if out.is_absolute() else base / out
    name = str(raw.get("name") or out.name)
    spec = dict(raw)
    inp = Path(str(raw["input"])).expanduser()
    spec["input"] = str(inp if inp.is_absolute() else base / inp)
    cache = Path(str(raw.get("cache_dir", DEFAULT_CACHE))).expanduser()
    spec["cache_dir"] = str(cache if cache.is_absolute() else base / cache)
    spec["sharpen"] = sharpen
    return Job(index, name, spec, s, out)


def _input_identity(path: str) -> list:
    p = Path(path)
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


class PipelineCache:
    """Keeps the pipeline (and ControlNet) of the last model used, so jobs share one load."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, model: str, controlnet: Optional[str], control: bool, sharpen: float = 0.0):
        from .models import is_builtin, load_controlnet, load_pipeline

        key = (model, controlnet if control else None, control, sharpen)
        if key != self.key:
            self.key = self.value = None
            pipe = load_pipeline(model, sharpen=sharpen)
            builtin = is_builtin(model)
            cn = load_controlnet(controlnet, pipe, builtin) if control else None
            self.key, self.value = key, (pipe, cn)
        return self.value


def _prepare_output(out: Path) -> Path:
    """Create a temporary sibling folder of `out` (fails early when the place is not writable)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        probe = tmp / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output {str(out)!r} is not writable: {e.strerror or e}") from e
    return tmp


def run_job(job: Job, pipes: PipelineCache, progress_factory=None) -> JobResult:
    """Run one job; never raises for job-level problems (the result says failed and why)."""
    res = JobResult(job.name, "failed", output=str(job.output))
    tmp = None
    t0 = time.perf_counter()
    try:
        tmp = _prepare_output(job.output)
        sel = job.spec.get("frames") or {}
        clip = read_frames(job.spec["input"], sel.get("start", 0), sel.get("end"), sel.get("stride", 1), sel.get("max"))
        frames, note = fit_size(clip.frames, job.spec.get("size"))
        res.frames, res.size = len(frames), f"{frames[0].shape[1]}x{frames[0].shape[0]}"
        model = str(job.spec.get("model", "tiny"))
        sharpen = job.spec.get("sharpen", 0.0)
        pipe, cn = pipes.get(model, job.spec.get("controlnet"), job.settings.control is not None, sharpen)
        cache_dir = job.spec.get("cache_dir", DEFAULT_CACHE)
        editor = VideoEditor(pipe, cn, cache_dir=cache_dir, model_id=model_id(model, sharpen))
        key = json.dumps([_input_identity(job.spec["input"]), sel, res.size, len(frames)])
        s = job.settings
        total = s.steps + (s.steps if s.mode == "invert" else 0)
        bar = progress_factory(total, job.name) if progress_factory else None
        try:
            out = editor.edit(
                frames, job.spec.get("source_prompt", ""), job.spec["edit_prompt"], s, cache_key=key,
                progress=bar.update if bar is not None else None, timings=res.timings,
            )
        finally:
            if bar is not None:
                bar.close()
        res.warp_error = warp_error(out, frames)
        fps = float(job.spec.get("fps") or clip.fps)
        write_mp4(out, tmp / "output.mp4", fps)
        write_frames(out, tmp / "frames")
        res.seconds = time.perf_counter() - t0
        res.status = "done"
        res.message = "; ".join(x for x in (note, "inversion from cache" if editor.last_cache_hit else "") if x)
        meta = {
            "name": job.name, "spec": job.spec, "frames": res.frames, "size": res.size, "fps": fps,
            "warp_error": res.warp_error, "seconds": res.seconds, "timings": res.timings, "note": note,
        }
        (tmp / "job.json").write_text(json.dumps(meta, indent=2, default=str))
        if job.output.exists():
            shutil.rmtree(job.output) if job.output.is_dir() else job.output.unlink()
        os.replace(tmp, job.output)
        tmp = None
    except Exception as e:  # one job's failure must not stop the batch
        res.status = "failed"
        res.message = f"{type(e).__name__}: {e}"
        if os.environ.get("TOMESD_EXT_DEBUG"):
            traceback.print_exc()
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        res.seconds = res.seconds or time.perf_counter() - t0
    return res


def is_finished(job: Job) -> bool:
    return (job.output / "job.json").is_file()


def format_table(results: List[JobResult]) -> str:
    rows = [("job", "status", "frames", "size", "s/frame", "warp err", "output / message")]
    for r in results:
        spf = f"{r.seconds / r.frames:.2f}" if r.frames and r.status == "done" else "-"
        we = f"{r.warp_error:.5f}" if r.status == "done" and r.warp_error == r.warp_error else "-"
        msg = r.output if r.status != "failed" else r.message
        if r.status == "done" and r.message:
            msg += f" ({r.message})"
        rows.append((r.name, r.status, str(r.frames or "-"), r.size or "-", spf, we, msg))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:6], widths)) + "  " + row[6])
        if j == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 16)
    return "\n".join(lines)
