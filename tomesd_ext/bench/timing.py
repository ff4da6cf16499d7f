"""The one timing meter of the benches: wall-clock seconds with the device synchronised, or
(``clock="cpu"``, CPU only) the CPU seconds of this process, which waiting for a core on a loaded
machine does not add to (run it with one thread: OMP_NUM_THREADS=1, so no thread spins waiting for
a descheduled sibling).

`timed` times one call; `interleaved` times several callables round by round (A/B/C, A/B/C or
rotated / reversed orders) so noise on a shared machine hits all alike; `summary` reduces
repeated timings to median, min and max.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Mapping, Sequence, TypeVar

import torch

T = TypeVar("T")
ORDERS = ("fixed", "rotate", "reverse")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def synchronize(device="cpu") -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device="cpu", clock: str = "wall"):
    """Run fn() once; returns (result, seconds) with the device synchronised around it.
    clock: "wall" (perf_counter) or "cpu" (this process's CPU time, all threads)."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    result = fn()
    synchronize(device)
    return result, now() - start


def round_order(items: Sequence[T], round_index: int, order: str = "fixed") -> List[T]:
    """The order of `items` in round `round_index`: fixed (A/B/C every round), rotate (A/B/C,
    B/C/A, ...) or reverse (A/B/C, C/B/A, ...)."""
    items = list(items)
    if order == "fixed":
        return items
    if order == "rotate":
        shift = round_index % len(items)
        return items[shift:] + items[:shift]
    if order == "reverse":
        return items if round_index % 2 == 0 else items[::-1]
    raise ValueError(f"order {order!r}: choose from {', '.join(ORDERS)}")


def interleaved(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 0, device="cpu", order: str = "fixed"
) -> Dict[str, List[float]]:
    """Seconds of every callable per round: `warmup` untimed rounds, then `repeats` timed ones,
    each calling every callable once in `round_order(order)`. Returns name -> [seconds per round]."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in round_order(names, rep, order):
            seconds[name].append(timed(fns[name], device)[1])
    return seconds


def summary(seconds: List[float]) -> dict:
    """Median, min and max of repeated timings."""
    return {
        "seconds_median": statistics.median(seconds),
        "seconds_min": min(seconds),
        "seconds_max": max(seconds),
    }
