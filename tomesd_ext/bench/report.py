"""Bench results: the JSON document (written atomically) and the stdout table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import List, Optional

ROW_FIELDS = (  # every row; video-transformer rows add frames, latent_frames, tokens, frame_change, temporal
    "method", "ratio", "ratio_requested", "resolution", "batch", "seconds_median", "seconds_min", "seconds_max", "speedup",
    "peak_mem_mb", "rel_error", "psnr", "ssim", "input",
)


def commit() -> str:
    """Short commit of the package's checkout (+ "-dirty" with uncommitted changes), or "unknown"."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def header(subject, settings: dict, attention_backend: str) -> dict:
    import diffusers
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["tomesd-ext"] + sys.argv[1:]),
        "commit": commit(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(subject.device) + (f" ({torch.cuda.get_device_name(subject.device)})" if subject.device.type == "cuda" else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "dtype": str(subject.dtype).replace("torch.", ""),
        "attention_backend": attention_backend,
        "model": subject.name,
        "weights": "real" if subject.real_weights else "seeded random" + (" (sharpened self-attention)" if subject.sharpened else ""),
        **settings,
    }


def write_json(path: str, document: dict) -> None:
    """Write `document` to `path` atomically (a temporary file, then os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(document, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _clamped(r: dict) -> bool:
    """Whether the row ran another ratio than the one requested (clamped to the method's maximum)."""
    return r.get("ratio_requested") is not None and r["ratio"] != r["ratio_requested"]


def _ratio_cell(r: dict) -> str:
    """The markdown ratio: what ran, and the requested one beside it when it was clamped."""
    return _fmt(r["ratio"], "g") + (f" ({r['ratio_requested']:g} requested)" if _clamped(r) else "")


def clamp_note(rows: List[dict]) -> str:
    """One line per method and requested ratio that ran clamped ("" when none did)."""
    seen = dict.fromkeys((r["method"], r["ratio_requested"], r["ratio"]) for r in rows if _clamped(r))
    return "\n".join(f"* {m}: --ratios {want:g} is above its maximum; ran at {got:g}" for m, want, got in seen)


def table(rows: List[dict], title: Optional[str] = None) -> str:
    """A fixed-width text table of result rows (with --steps N, also the final latents' error; video
    transformers: the temporal figure, frame change relative to the baseline's)."""
    latent = any(r.get("rel_error_latent") is not None for r in rows)
    temporal = any(r.get("temporal") is not None for r in rows)
    w = max([12] + [len(r["method"]) for r in rows])  # stacks: "tome+taylorseer"
    head = f"{'method':<{w}} {'ratio':>5} {'res':>5} {'input':<9} {'median s':>9} {'min-max s':>15} {'speedup':>7} {'mem MB':>8} {'rel_err':>8} {'psnr':>6} {'ssim':>6}"
    head += f" {'err_latent':>10}" if latent else ""
    head += f" {'temporal':>8}" if temporal else ""
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<{w}} {_fmt(r['ratio'], '.2f') + '*' * _clamped(r):>5} {r['resolution']:>5} {r['input']:<9} "
            f"{r['seconds_median']:>9.3f} {r['seconds_min']:>7.3f}-{r['seconds_max']:<7.3f} {r['speedup']:>6.2f}x "
            f"{_fmt(r['peak_mem_mb'], '.0f'):>8} {r['rel_error']:>8.4f} {_fmt(r['psnr'], '.2f', 'inf'):>6} {r['ssim']:>6.4f}"
            + (f" {_fmt(r.get('rel_error_latent'), '.4f'):>10}" if latent else "")
            + (f" {_fmt(r.get('temporal'), '.4f'):>8}" if temporal else "")
        )
    note = clamp_note(rows)
    return "\n".join(lines + ([note] if note else []))


def block_table(rows: List[dict]) -> str:
    """Per-block lines of a diffusion transformer's rows (one input: timings pool all inputs):
    median seconds of one call of the first block of each kind, and speed-up against baseline."""
    rows = [r for r in rows if r.get("block_seconds") and r["input"] == rows[0]["input"]]
    base = next((r["block_seconds"] for r in rows if r["method"] == "baseline"), {})
    names = sorted({k for r in rows for k in r["block_seconds"]})
    lines = ["first block of each kind, median s per call (speed-up vs baseline):"]
    for r in rows:
        cells = [f"{k}[0] {r['block_seconds'][k]:.3f} ({base[k] / r['block_seconds'][k]:.2f}x)"
                 for k in names if k in r["block_seconds"] and k in base]
        lines.append(f"  {r['method']:<12} {_fmt(r['ratio'], '.2f'):>5} {r['resolution']:>5}  " + "   ".join(cells))
    return "\n".join(lines)


def stack_table(rows: List[dict]) -> str:
    """Lines for the stack methods' extra fields: tail-block skips of a cache (per input) and the
    compile figures of a compiled configuration (per configuration: they do not depend on input)."""
    lines = ["stacks:"]
    seen = set()
    for r in rows:
        name = f"{r['method']:<12} {_fmt(r['ratio'], '.2f'):>5} {r['resolution']:>5}"
        if "cache_hits" in r:
            lines.append(f"  {name} {r['input']:<9} tail blocks skipped on {r['cache_hits']} of {r['denoiser_calls']} denoiser calls")
        if "compile_seconds" in r and (r["method"], r["ratio"]) not in seen:
            seen.add((r["method"], r["ratio"]))
            lines.append(f"  {name} first call (compiles) {r['compile_seconds']:.1f} s, graph breaks {r['graph_breaks']}, "
                         f"recompiles in measured calls {r['recompiles']} (untimed calls after the first {r['recompiles_warmup']})")
    return "\n".join(lines)


def markdown_table(rows: List[dict]) -> str:
    """Rows as a GitHub markdown table (for docs/benchmarks.md); video rows add the temporal figure."""
    temporal = any(r.get("temporal") is not None for r in rows)
    lines = [
        "| method | ratio | px | input | median s | min-max s | speed-up | peak MB | rel_error | PSNR | SSIM |" + " temporal |" * temporal,
        "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * temporal,
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_ratio_cell(r)} | {r['resolution']} | {r['input']} | {r['seconds_median']:.2f} "
            f"| {r['seconds_min']:.2f}-{r['seconds_max']:.2f} | {r['speedup']:.2f}x | {_fmt(r['peak_mem_mb'], '.0f')} "
            f"| {r['rel_error']:.4f} | {_fmt(r['psnr'], '.2f', 'inf')} | {r['ssim']:.4f} |"
            + (f" {_fmt(r.get('temporal'), '.4f')} |" if temporal else "")
        )
    return "\n".join(lines)
