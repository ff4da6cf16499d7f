"""Kernel micro-bench (`tomesd-ext bench --micro`): the merging operators alone, no model.

At the first merged level of a resolution (the highest-resolution level with transformer blocks:
tokens (B, h*w, C)): one merge plan (partition + matching + top-r), merge + unmerge with that
plan, per kernel backend (torch; CUDA too on a CUDA device), and the top-r selection's stable
sort against torch.topk(sorted=False) on (B, S) scores (S = source tokens). Medians of `repeats`
calls after one warm-up call. On CUDA the plan's extra peak memory is reported too.
"""

from __future__ import annotations

import statistics

import torch

from .memory import PeakMemory
from .methods import kernel_mode
from .timing import interleaved


def merged_level(unet_config, resolution: int) -> tuple:
    """(side, channels) of the first level with cross-attention blocks at `resolution` px: its
    token grid is side x side, its tokens have `channels` features (SD1.x 512 px: 64, 320)."""
    level = next(i for i, kind in enumerate(unet_config.down_block_types) if "CrossAttn" in kind)
    return resolution // 8 // 2**level, unet_config.block_out_channels[level]


def _median_ms(fn, repeats: int, device) -> float:
    return 1e3 * statistics.median(interleaved({"fn": fn}, repeats, warmup=1, device=device)["fn"])


def micro(unet_config, resolution: int, batch: int, ratio: float, device, dtype, repeats: int = 20, seed: int = 0) -> dict:
    """Milliseconds of the merging operators at the first merged level; one dict per resolution."""
    from ..core import ToMeOptions, merge, tome_plan, unmerge

    device = torch.device(device)
    side, channels = merged_level(unet_config, resolution)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, side * side, channels, generator=g).to(device, dtype)
    opts = ToMeOptions.create(ratio=ratio, seed=seed, min_tokens=0)
    out = {"resolution": resolution, "tokens": side * side, "channels": channels, "batch": batch, "ratio": ratio,
           "repeats": repeats}
    for mode in ["torch"] + (["cuda"] if device.type == "cuda" else []):
        try:
            with kernel_mode(mode):
                plan = tome_plan(x, side, side, opts, seed=1)
                out[f"plan_ms_{mode}"] = _median_ms(lambda: tome_plan(x, side, side, opts, seed=1), repeats, device)
                out[f"merge_unmerge_ms_{mode}"] = _median_ms(lambda: unmerge(merge(x, plan), plan), repeats, device)
                if device.type == "cuda":
                    with PeakMemory(device) as mem:
                        tome_plan(x, side, side, opts, seed=1)
                    out[f"plan_extra_mib_{mode}"] = mem.mb
        except Exception as exc:  # noqa: BLE001  (e.g. the CUDA extension cannot be built here)
            out[f"error_{mode}"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    sources = side * side - (side // 2) * (side // 2)
    r = min(int(ratio * side * side), sources)
    score = torch.rand(batch, sources, generator=g).to(device)
    out["sort_ms"] = _median_ms(lambda: torch.sort(score, dim=-1, descending=True, stable=True), repeats, device)
    out["topk_unsorted_ms"] = _median_ms(lambda: torch.topk(score, r, dim=-1, sorted=False), repeats, device)
    return out


def micro_table(rows) -> str:
    """One line per resolution: plan and merge+unmerge per backend, sort vs topk."""
    lines = ["\nmicro (ms): merging operators alone at the first merged level"]
    for r in rows:
        parts = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                 if k not in ("resolution", "tokens", "channels", "batch", "ratio", "repeats")]
        lines.append(f"{r['resolution']}px ({r['tokens']} tokens x {r['channels']}, batch {r['batch']}): " + ", ".join(parts))
    return "\n".join(lines)
