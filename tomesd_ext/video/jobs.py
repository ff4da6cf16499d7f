"""Batch video editing jobs (tomesd-ext edit-video JOBS.yaml).

JOBS.yaml holds `jobs:` (a list of mappings) and optional `defaults:` merged under every job.
Each finished job writes OUTPUT/output.mp4, OUTPUT/frames/NNNN.png and OUTPUT/job.json into a
temporary folder that is renamed into place at the end (atomic); a rerun skips jobs whose
job.json exists; a failing job is reported and the others still run.

Nothing is deleted that the job did not write: an output that is, contains or lies inside an
input, the jobs file, the cache or another job's output is refused at parse time, and an existing
output folder is replaced only when it is this job's previous output (its job.json names the job).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..core.options import OptionError, check_int
from .editor import EditSettings, VideoEditor
from .flow_editor import DEFAULT_TOME, FlowEditSettings, FlowVideoEditor
from .io import fit_size, read_frames, write_frames, write_mp4
from .models import backend_of, check_pipeline_field, model_id, resolve_sharpen
from .warp import warp_error

REQUIRED = ("input", "output", "edit_prompt")
FIELDS = {
    "name": "job name (default: the output folder's name)",
    "input": "mp4/gif file or folder of frames",
    "output": "output folder (gets output.mp4, frames/, job.json)",
    "source_prompt": "prompt describing the input (needed by mode invert)",
    "edit_prompt": "prompt of the edit",
    "mode": "SD models: invert (DDIM inversion) or sdedit (partial strength); video transformers: sdedit or flowedit",
    "strength": "sdedit strength in (0, 1]",
    "n_max": "flowedit: steps edited (the last n_max of `steps`; default round(0.66 * steps))",
    "n_min": "flowedit: last steps run as plain sampling with the edit prompt (default 0)",
    "n_avg": "flowedit: noise draws averaged per step (default 1)",
    "source_guidance": "flowedit: CFG scale of the source prompt (default 1.5)",
    "tome": "video transformers: false (unmerged) or apply_tome options {ratio, dit_mode, st, frame_reach, keep_first_frame, min_tokens, skip_ends, seed}",
    "frames": "{start, end, stride, max}",
    "size": "short side (int) or [width, height]; rounded to a multiple of 8 (video transformers: of 2)",
    "steps": "DDIM steps",
    "guidance": "CFG scale (of the edit prompt; default 7.5, Wan 5.0, LTX-Video 3.0)",
    "negative_prompt": "negative prompt",
    "seed": "seed of merging and noise",
    "model": "built-in name (tiny, sd15, sd21; wan-tiny, ltx-tiny, wan-1.3b-depth4) or local checkpoint / diffusers folder",
    "pipeline": "with a single-file Wan / LTX-Video transformer as model: the pipeline of that family around it (local diffusers folder or wan-tiny, wan-1.3b-depth4, ltx-tiny)",
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
    settings: Any  # EditSettings (SD models) or FlowEditSettings (video transformers)
    output: Path


NOT_DONE = "not done"  # the status of a job that was not finished because its run stopped (--ray: cluster lost)


@dataclass
class JobResult:
    name: str
    status: str  # done | skipped | failed | NOT_DONE
    frames: int = 0
    size: str = ""
    seconds: float = 0.0
    warp_error: float = float("nan")
    output: str = ""
    message: str = ""
    timings: Dict[str, float] = field(default_factory=dict)
    retries: int = 0  # times the job was restarted after its worker died (edit-video --ray)


def load_jobs_file(path) -> tuple:
    """(list of raw job mappings merged over defaults, base folder of relative paths)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise JobError(f"jobs file {str(p)!r} is not a text (UTF-8) file: byte {e.start} cannot be decoded") from e
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


def _check_fields(raw: dict) -> None:
    """Types and ranges of the fields EditSettings does not check (OptionError naming the field)."""
    for key in ("input", "output", "name"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            raise OptionError(f"{key} must be a string, got {value!r} ({type(value).__name__})")
    for key in ("edit_prompt", "source_prompt", "negative_prompt", "model", "pipeline", "controlnet", "cache_dir"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise OptionError(f"{key} must be a string, got {raw[key]!r} ({type(raw[key]).__name__})")
    frames = raw.get("frames") or {}
    if not isinstance(frames, dict) or set(frames) - {"start", "end", "stride", "max"}:
        raise OptionError(f"frames must be a mapping of start, end, stride, max; got {frames!r}")
    for key, lo in (("start", 0), ("end", 0), ("stride", 1), ("max", 1)):
        if frames.get(key) is not None or (key in ("start", "stride") and key in frames):
            check_int(f"frames.{key}", frames[key], lo)
    fps = raw.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000):
        raise OptionError(f"fps={fps!r} is out of range: allowed a number in (0, 1000]")
    scale = raw.get("control_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 10:
        raise OptionError(f"control_scale={scale!r} is out of range: allowed a number in [0, 10]")


def _within(a: Path, b: Path) -> bool:
    """a is b or lies inside b (resolved paths)."""
    return a == b or b in a.parents


def _overlap(out: Path, other: Path, what: str) -> Optional[str]:
    """Why `out` may not be written (it is, contains or lies inside `other`), or None."""
    if out == other:
        return f"is {what}"
    if _within(other, out):
        return f"contains {what}"
    if _within(out, other):
        return f"lies inside {what}"
    return None


def _owner(folder: Path) -> Optional[str]:
    """The job name in folder/job.json, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((folder / "job.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None


def _check_replaceable(out: Path, name: str, label: str) -> None:
    """An existing output may only be an empty folder or this job's previous output."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise JobError(f"{label}: output {str(out)!r} exists and is not a folder; choose another output")
    if any(out.iterdir()) and _owner(out) != name:
        raise JobError(
            f"{label}: output {str(out)!r} exists and is not the output of job {name!r} (no job.json of this job); "
            "choose another output or remove that folder yourself"
        )


FLOW_ONLY = ("tome", "n_max", "n_min", "n_avg", "source_guidance")
SD_ONLY = ("vidtome", "control", "controlnet", "control_scale", "chunk_size")


def _sd_settings(raw: dict, mode: str, negative) -> EditSettings:
    """EditSettings of a job on a Stable Diffusion model (OptionError naming the field)."""
    given = [k for k in FLOW_ONLY if raw.get(k) is not None]
    if given:
        raise OptionError(f"field(s) {given} apply to video-transformer models (wan-tiny, a Wan / LTX-Video folder); "
                          f"model {raw.get('model', 'tiny')!r} is a Stable Diffusion model (it merges with `vidtome`)")
    vt = raw.get("vidtome", {})
    if vt is True or vt is None:
        vt = {}
    if vt is False:
        vt = None
    if vt is not None and not isinstance(vt, dict):
        raise OptionError(f"vidtome must be false or a mapping of options, got {vt!r}")
    if vt and "chunk_size" in vt:
        raise OptionError("set chunk_size on the job, not inside vidtome")
    control = raw.get("control")
    control = None if control in (None, False, "none") else control
    return EditSettings(
        mode=mode,
        steps=raw.get("steps", 8),
        guidance=raw.get("guidance", 7.5),
        strength=raw.get("strength", 0.8),
        seed=raw.get("seed", 0),
        negative_prompt="" if negative is None else negative,  # `negative_prompt:` left empty = ""
        chunk_size=raw.get("chunk_size", 4),
        vidtome=vt,
        control=control,
        control_scale=raw.get("control_scale", 1.0),
    ).check()


def _flow_settings(raw: dict, mode: str, negative) -> FlowEditSettings:
    """FlowEditSettings of a job on a video transformer (OptionError naming the field). The SD
    fields are refused unless they say "off" (vidtome: false, control: none), so a `defaults:`
    block can serve a mixed batch."""
    given = [k for k in SD_ONLY if raw.get(k) not in (None, False, "none") and not (k == "control_scale" and raw[k] == 1.0)]
    if given:
        raise OptionError(f"field(s) {given} apply to Stable Diffusion models; model {raw.get('model')!r} is a video "
                          "transformer (it merges with `tome`, edits the whole clip in one call, has no ControlNet)")
    tome = raw.get("tome", True)
    tome = dict(DEFAULT_TOME) if tome is True or tome is None else (None if tome is False else tome)
    if isinstance(tome, dict):
        tome = {**DEFAULT_TOME, **tome}
    return FlowEditSettings(
        mode=mode,
        steps=raw.get("steps", 8),
        guidance=raw.get("guidance"),
        source_guidance=raw.get("source_guidance", 1.5),
        strength=raw.get("strength", 0.8),
        n_max=raw.get("n_max"),
        n_min=raw.get("n_min", 0),
        n_avg=raw.get("n_avg", 1),
        seed=raw.get("seed", 0),
        negative_prompt="" if negative is None else negative,
        tome=tome,
    ).check()


def parse_job(index: int, raw, base: Path, jobs_file: Optional[Path] = None) -> Job:
    """Validate one job mapping; raises JobError naming the job and the problem."""
    label = f"job {index + 1}"
    if not isinstance(raw, dict):
        raise JobError(f"{label}: must be a mapping, got {type(raw).__name__}")
    if raw.get("name"):
        label = f"job {index + 1} ({raw['name']})"
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise JobError(f"{label}: unknown field(s) {unknown}; allowed: {', '.join(FIELDS)}")
    flow = backend_of(str(raw.get("model", "tiny"))) == "flow"
    missing = [k for k in REQUIRED if not raw.get(k)]
    mode = raw.get("mode", "sdedit" if flow else "invert")
    if mode in ("invert", "flowedit") and not raw.get("source_prompt"):
        missing.append("source_prompt")
    if missing:
        raise JobError(f"{label}: missing required field(s) {missing}")
    negative = raw.get("negative_prompt", "ugly, blurry, low res")
    try:
        _check_fields(raw)
        check_pipeline_field(str(raw.get("model", "tiny")), raw.get("pipeline"))
        s = _flow_settings(raw, mode, negative) if flow else _sd_settings(raw, mode, negative)
    except (OptionError, TypeError) as e:
        raise JobError(f"{label}: {e}") from e
    try:
        sharpen = resolve_sharpen(str(raw.get("model", "tiny")), raw.get("sharpen", "auto"))
    except OptionError as e:
        raise JobError(f"{label}: {e}") from e
    size = raw.get("size")
    if size is not None and not (
        (isinstance(size, int) and size >= 8)
        or (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v >= 8 for v in size))
    ):
        raise JobError(f"{label}: size must be an int >= 8 or [width, height], got {size!r}")
    out, inp, cache = (_path(raw.get(k, d), base) for k, d in (("output", ""), ("input", ""), ("cache_dir", DEFAULT_CACHE)))
    name = str(raw.get("name") or out.name)
    for other, what in ((inp, "the input"), (jobs_file, "the jobs file"), (cache, "the cache (cache_dir)")):
        why = other is not None and _overlap(out, Path(other).resolve(), f"{what} {str(other)!r}")
        if why:
            raise JobError(f"{label}: output {str(out)!r} {why}; choose an output folder of its own")
    _check_replaceable(out, name, label)
    spec = dict(raw)
    spec["input"], spec["cache_dir"] = str(inp), str(cache)
    spec["negative_prompt"] = s.negative_prompt
    spec["sharpen"] = sharpen
    return Job(index, name, spec, s, out)


def _path(value, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def parse_jobs(raw: list, base: Path, jobs_file: Optional[Path] = None) -> list:
    """[(index, Job or JobError)] of every job, with the checks between jobs: a job whose output
    is, contains or lies inside an earlier job's output or input (or whose input is the earlier
    job's output) is refused, naming both jobs."""
    parsed, ok = [], []
    for i, item in enumerate(raw):
        try:
            job = parse_job(i, item, base, jobs_file)
        except JobError as e:
            parsed.append((i, e))
            continue
        label = f"job {i + 1} ({job.name})"
        err = None
        for prev in ok:
            plabel = f"job {prev.index + 1} ({prev.name})"
            prev_in, inp = Path(prev.spec["input"]), Path(job.spec["input"])
            why = _overlap(job.output, prev.output, f"the output of {plabel}") or _overlap(
                job.output, prev_in, f"the input of {plabel}")
            if why:
                err = JobError(f"{label}: output {str(job.output)!r} {why}; every job needs an output folder of its own")
            elif _overlap(prev.output, inp, "x"):
                err = JobError(f"{label}: input {str(inp)!r} overlaps the output of {plabel}, which that job replaces")
            if err:
                break
        if err:
            parsed.append((i, err))
        else:
            ok.append(job)
            parsed.append((i, job))
    return parsed


def _input_identity(path: str) -> str:
    """SHA-256 of the input's bytes (a folder: of its file names and bytes, sorted by name), so a
    cached inversion is found by content wherever the shared storage is mounted."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        if p.is_dir():
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def inversion_group(job: Job) -> Optional[tuple]:
    """What a job's inversion depends on (input path, frame selection, size, model, sharpening,
    source prompt, steps), or None for sdedit: jobs with equal groups share one cached inversion,
    so a scheduler runs them one after another. Read from the spec only (no file access)."""
    if job.settings.mode != "invert":
        return None
    spec = job.spec
    return tuple(json.dumps(spec.get(k), sort_keys=True, default=str)
                 for k in ("input", "frames", "size", "model", "sharpen", "source_prompt", "steps", "cache_dir"))


class PipelineCache:
    """Keeps the pipeline (and ControlNet) of the last model used, so jobs share one load.
    device: where to move them (None = where load_pipeline puts them, the CPU)."""

    def __init__(self, device: Optional[str] = None):
        self.key = None
        self.value = None
        self.device = device

    def get(self, model: str, controlnet: Optional[str], control: bool, sharpen: float = 0.0,
            pipeline: Optional[str] = None):
        from .models import is_builtin, load_controlnet, load_pipeline

        key = (model, controlnet if control else None, control, sharpen, pipeline)
        if key != self.key:
            self.key = self.value = None
            pipe = load_pipeline(model, sharpen=sharpen, pipeline=pipeline)
            builtin = is_builtin(model)
            cn = load_controlnet(controlnet, pipe, builtin) if control else None
            if self.device is not None:
                pipe.to(self.device)
                cn = cn.to(self.device) if cn is not None else None
            self.key, self.value = key, (pipe, cn)
        return self.value


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _clear_stale(out: Path, dead_pid: Optional[int] = None) -> None:
    """Remove .OUT.tmp-PID / .OUT.old-PID siblings of `out` left by a run that was killed: those
    of `dead_pid` when given (a process known to be dead, possibly on another host), else those
    whose PID is gone on this host."""
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-"
        for p in out.parent.glob(f".*.{kind}-*"):
            pid = p.name[len(prefix):]
            if not (p.name.startswith(prefix) and pid.isdigit()):
                continue
            if (int(pid) == dead_pid) if dead_pid is not None else (int(pid) == os.getpid() or not _pid_alive(int(pid))):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def discard_partial(job: Job, pid: int) -> None:
    """Remove what the dead process `pid` left of this job's output (its temporaries)."""
    if job.output.parent.is_dir():
        _clear_stale(job.output, dead_pid=pid)


def _prepare_output(out: Path) -> Path:
    """Create a temporary sibling folder of `out` (fails early when the place is not writable),
    after clearing this output's stale temporaries."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        probe = tmp / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output {str(out)!r} is not writable: {e.strerror or e}") from e
    return tmp


def _install(tmp: Path, job: Job) -> None:
    """Rename the finished temporary folder into place. A previous output (checked again: this
    job's own, or an empty folder) is first renamed aside and deleted only after the swap."""
    label = f"job {job.index + 1} ({job.name})"
    out = job.output
    _check_replaceable(out, job.name, label)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def run_job(job: Job, pipes: PipelineCache, progress_factory=None) -> JobResult:
    """Run one job; never raises for job-level problems (the result says failed and why)."""
    res = JobResult(job.name, "failed", output=str(job.output))
    tmp = None
    t0 = time.perf_counter()
    try:
        tmp = _prepare_output(job.output)
        sel = job.spec.get("frames") or {}
        clip = read_frames(job.spec["input"], sel.get("start", 0), sel.get("end"), sel.get("stride", 1), sel.get("max"))
        flow = isinstance(job.settings, FlowEditSettings)  # runs at its own multiple, resized back: keep the size
        frames, note = fit_size(clip.frames, job.spec.get("size"), multiple=2 if flow else 8)
        res.frames, res.size = len(frames), f"{frames[0].shape[1]}x{frames[0].shape[0]}"
        model = str(job.spec.get("model", "tiny"))
        sharpen = job.spec.get("sharpen", 0.0)
        pipe, cn = pipes.get(model, job.spec.get("controlnet"), getattr(job.settings, "control", None) is not None, sharpen,
                             job.spec.get("pipeline"))
        s = job.settings
        fps = float(job.spec.get("fps") or clip.fps)
        notes = [note]
        if flow:
            editor = FlowVideoEditor(pipe)
            bar = progress_factory(editor.steps_of(s), job.name) if progress_factory else None
            try:
                out = editor.edit(frames, job.spec.get("source_prompt", ""), job.spec["edit_prompt"], s, fps=fps,
                                  progress=bar.update if bar is not None else None, timings=res.timings)
            finally:
                if bar is not None:
                    bar.close()
            merged = "merged" if editor.last_merged else "not merged" + (" (under min_tokens)" if s.tome is not None else "")
            notes.append(f"{s.mode}: no inversion cache needed; {merged}")
        else:
            cache_dir = job.spec.get("cache_dir", DEFAULT_CACHE)
            editor = VideoEditor(pipe, cn, cache_dir=cache_dir, model_id=model_id(model, sharpen))
            key = json.dumps([_input_identity(job.spec["input"]), sel, res.size, len(frames)])
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
            notes.append("inversion from cache" if editor.last_cache_hit else "")
        res.warp_error = warp_error(out, frames)
        write_mp4(out, tmp / "output.mp4", fps)
        write_frames(out, tmp / "frames")
        res.seconds = time.perf_counter() - t0
        res.status = "done"
        res.message = "; ".join(x for x in notes if x)
        meta = {
            "name": job.name, "spec": job.spec, "frames": res.frames, "size": res.size, "fps": fps,
            "warp_error": res.warp_error, "seconds": res.seconds, "timings": res.timings, "note": note,
        }
        (tmp / "job.json").write_text(json.dumps(meta, indent=2, default=str))
        _install(tmp, job)
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
    """The summary table; a `retries` column is added when some job was restarted (--ray)."""
    retried = any(r.retries for r in results)
    rows = [("job", "status", "frames", "size", "s/frame", "warp err") + (("retries",) if retried else ()) + ("output / message",)]
    for r in results:
        spf = f"{r.seconds / r.frames:.2f}" if r.frames and r.status == "done" else "-"
        we = f"{r.warp_error:.5f}" if r.status == "done" and r.warp_error == r.warp_error else "-"
        msg = r.message if r.status in ("failed", NOT_DONE) else r.output
        if r.status == "done" and r.message:
            msg += f" ({r.message})"
        extra = (str(r.retries),) if retried else ()
        rows.append((r.name, r.status, str(r.frames or "-"), r.size or "-", spf, we) + extra + (msg,))
    n = len(rows[0]) - 1
    widths = [max(len(row[i]) for row in rows) for i in range(n)]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:n], widths)) + "  " + row[n])
        if j == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 16)
    return "\n".join(lines)
