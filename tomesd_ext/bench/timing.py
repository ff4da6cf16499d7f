"""Wall-clock timing and peak memory of one denoiser call.

Peak memory is the extra memory a call needs above what was held before it:
- CUDA: torch.cuda.max_memory_allocated() during the call minus memory_allocated() before it;
- CPU: the peak resident set size (/proc/self/statm, sampled every millisecond by a thread)
  during the call minus the RSS before it. Freed memory that the allocator keeps mapped is not
  seen again as growth, so this is a lower bound of the transient need; None where /proc is
  missing.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import List, Optional

import torch

_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> Optional[int]:
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Context manager; `.mb` holds the peak extra memory of the block in MiB (or None)."""

    def __init__(self, device: torch.device, interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.mb: Optional[float] = None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = _rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
            return False
        if self._start is not None:
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes()
            self._peak = max(self._peak, rss or 0)
            self.mb = (self._peak - self._start) / 2**20
        return False


def timed(fn, device: torch.device):
    """Run fn() once; returns (result, seconds) with the device synchronised around it."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def summary(seconds: List[float]) -> dict:
    """Median, min and max of repeated timings."""
    return {
        "seconds_median": statistics.median(seconds),
        "seconds_min": min(seconds),
        "seconds_max": max(seconds),
    }
