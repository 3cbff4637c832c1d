"""Peak memory of a block of work: resident memory sampled on the CPU, allocator peak on CUDA."""

from __future__ import annotations

import os
import resource
import threading
import time

import torch


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Context manager: `.peak_mb` (peak RSS during the block), `.baseline_mb` (RSS at entry),
    `.increase_mb` = peak - baseline; on CUDA also `.cuda_peak_mb` (max allocated)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.baseline_mb = self.peak_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self.baseline_mb = self.peak_mb = rss_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20

    @property
    def increase_mb(self) -> float:
        return self.peak_mb - self.baseline_mb
