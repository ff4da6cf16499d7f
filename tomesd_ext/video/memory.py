"""Peak resident memory (RSS) of this process during a block of work, sampled by a thread.

tracemalloc does not see torch's allocations, so CPU peak memory is measured as the process RSS
(psutil), sampled every `interval` seconds, minus the RSS just before the block: "peak RSS
increase". On CUDA, torch.cuda.max_memory_allocated is reported as well.
"""

from __future__ import annotations

import threading
import time


class PeakRSS:
    """with PeakRSS() as m: ...; m.peak_mb = max RSS during the block minus RSS at entry (MiB)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_mb = 0.0
        self.cuda_peak_mb = None

    def __enter__(self):
        import gc

        import psutil
        import torch

        gc.collect()
        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = (self._peak - self._base) / 2**20
        if torch.cuda.is_available():
            self.cuda_peak_mb = (torch.cuda.max_memory_allocated() - self._cuda_base) / 2**20
        return False
