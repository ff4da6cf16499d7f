"""Ratios at equal error: the merge ratio at which each method reaches the error of a reference
configuration (e.g. spatial-only merging at ratio 0.5), read off a ratio sweep.

For each method, its rows (one input and resolution) sorted by ratio give rel_error as a function
of the ratio; the ratio at the reference error is linearly interpolated between the first two
neighbouring ratios whose errors bracket it (None when no pair does: the sweep does not reach it).
"""

from __future__ import annotations

from typing import List, Optional


def parse_reference(value: str):
    """"METHOD:RATIO" -> (method, ratio); ValueError naming the expected form."""
    method, sep, ratio = value.rpartition(":")
    try:
        if not sep or not method:
            raise ValueError
        return method, float(ratio)
    except ValueError:
        raise ValueError(f"--equal-error {value!r}: use METHOD:RATIO, e.g. tome-spatial:0.5") from None


def ratio_at_error(points, error: float) -> Optional[float]:
    """points: [(ratio, rel_error)]; the interpolated ratio where rel_error reaches ``error``."""
    points = sorted(points)
    for (r0, e0), (r1, e1) in zip(points, points[1:]):
        if min(e0, e1) <= error <= max(e0, e1):
            return r0 if e1 == e0 else r0 + (error - e0) * (r1 - r0) / (e1 - e0)
    return next((r for r, e in points if e == error), None)


def equal_error(rows: List[dict], method: str, ratio: float) -> List[dict]:
    """Per (resolution, input) with a row of (method, ratio): the reference error and, for every
    method with rows at two or more ratios, the ratio at which it reaches that error."""
    out = []
    for res, inp in dict.fromkeys((r["resolution"], r["input"]) for r in rows):
        group = [r for r in rows if r["resolution"] == res and r["input"] == inp and r["ratio"] is not None]
        ref = next((r for r in group if r["method"] == method and abs(r.get("ratio_requested", r["ratio"]) - ratio) < 1e-9), None)
        if ref is None:
            continue
        ratios = {}
        for name in dict.fromkeys(r["method"] for r in group):
            points = [(r["ratio"], r["rel_error"]) for r in group if r["method"] == name]
            if len(points) >= 2:
                ratios[name] = ratio_at_error(points, ref["rel_error"])
        out.append({"resolution": res, "input": inp, "reference": f"{method} {ratio:g}",
                    "rel_error": ref["rel_error"], "ratios": ratios})
    return out


def equal_error_text(entries: List[dict]) -> str:
    lines = []
    for e in entries:
        cells = ", ".join(f"{m} {'-' if r is None else format(r, '.3f')}" for m, r in e["ratios"].items())
        lines.append(f"ratio at the error of {e['reference']} (rel_error {e['rel_error']:.4f}), "
                     f"{e['resolution']} {e['input']}: {cells or 'no method has two ratios'}")
    return "\n".join(lines)
