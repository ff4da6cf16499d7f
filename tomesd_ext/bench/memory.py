"""The one memory meter of the benches: the peak extra memory of a block of work.

Peak memory is what the block needs above what was held at its start:
- RSS (CPU device): the process's peak resident set size, sampled by a thread every `interval`
  seconds (psutil), minus the RSS at entry. tracemalloc does not see torch's allocations, hence
  RSS. Freed memory that the allocator keeps mapped is not seen again as growth, so this is a
  lower bound of the transient need.
- CUDA (whenever CUDA is available): torch.cuda.max_memory_allocated during the block minus
  memory_allocated at entry.
`.mb` is the figure of the block's device: CUDA for a CUDA device, RSS otherwise.
"""

from __future__ import annotations

import gc
import threading
from typing import Optional

import torch

from .timing import synchronize


class PeakMemory:
    """with PeakMemory(device) as m: ...; then m.mb, m.rss_mb, m.cuda_mb in MiB (None = not measured).

    device: where the block's tensors live; RSS is sampled only for a CPU device.
    interval: RSS sampling period in seconds.
    collect: run the garbage collector before reading the starting RSS.
    """

    def __init__(self, device="cpu", interval: float = 0.001, collect: bool = False):
        self.device = torch.device(device)
        self.interval = interval
        self.collect = collect
        self.rss_mb: Optional[float] = None
        self.cuda_mb: Optional[float] = None

    @property
    def mb(self) -> Optional[float]:
        return self.cuda_mb if self.device.type == "cuda" else self.rss_mb

    def __enter__(self):
        if self.collect:
            gc.collect()
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self._cuda_device())
            self._cuda_start = torch.cuda.memory_allocated(self._cuda_device())
        self._thread = None
        if self.device.type != "cuda":
            import psutil

            self._proc = psutil.Process()
            self._rss_start = self._peak = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _cuda_device(self):
        return self.device if self.device.type == "cuda" else None

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.rss_mb = (self._peak - self._rss_start) / 2**20
        if self._cuda:
            synchronize(self.device)
            self.cuda_mb = (torch.cuda.max_memory_allocated(self._cuda_device()) - self._cuda_start) / 2**20
        return False
