"""Peak memory of one render: CUDA where torch renders on a GPU, else the process's resident set.

On Linux the resident-set high-water mark (VmHWM) can be reset by writing ``5`` to
``/proc/self/clear_refs``, so the peak is the render's own, not the process's lifetime peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path
from typing import Any

__all__ = ["PeakMemory", "release_freed_memory", "rss_mb"]

_STATUS = Path("/proc/self/status")
_LIBC: Any = None
_RSS_AFTER_TRIM: float | None = None
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """This process's resident set now, in MiB."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


class PeakMemory:
    """``start()`` before a render, ``stop()`` after: (peak MiB, "cuda" | "rss") or (None, None)."""

    def __init__(self, device: str) -> None:
        self._cuda = device.startswith("cuda")

    def start(self) -> None:
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:  # not Linux, or not allowed: the lifetime peak is still a bound
            pass

    def stop(self) -> tuple[float | None, str | None]:
        if self._cuda:
            import torch

            return round(torch.cuda.max_memory_allocated() / 2**20, 1), "cuda"
        kb = _status_kb("VmHWM")
        if kb is None and sys.platform != "linux":
            return None, None
        return (None, None) if kb is None else (round(kb / 1024, 1), "rss")


def release_freed_memory(every_mb: float = 64.0) -> bool:
    """Give memory freed by renders back to the OS (glibc ``malloc_trim``) once it adds up.

    Each render frees hundreds of MiB of tensors and frames; glibc keeps part of it in its heap,
    fragmented, and without trimming a long-running worker's resident set grew by about one
    video's frames per render (measured: ~630 KiB per 64x64x9 render; see docs/benchmarks.md).
    Trimming after every render costs 5-20 ms (the trim, then page faults as the next render
    takes the memory back), so it runs only once the resident set is ``every_mb`` above its level
    after the first render since the last trim: the growth is bounded, the cost amortised.
    Returns whether it trimmed.
    A no-op where the C library has no ``malloc_trim``.
    """
    global _LIBC, _RSS_AFTER_TRIM
    rss = rss_mb()
    if rss is None:
        return False
    if _RSS_AFTER_TRIM is None:
        _RSS_AFTER_TRIM = rss
    if rss - _RSS_AFTER_TRIM < every_mb:
        return False
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is None:
        return False
    trim(0)
    # The next render takes back its working set; measure the margin from there, not from the
    # trough right after the trim (that would trim again after almost every render).
    _RSS_AFTER_TRIM = None
    return True
