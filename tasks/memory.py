"""Peak memory of one render: CUDA where torch renders on a GPU, else the process's resident set.

On Linux the resident-set high-water mark (VmHWM) can be reset by writing ``5`` to
``/proc/self/clear_refs``, so the peak is the render's own, not the process's lifetime peak.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.allocator import libc

__all__ = ["PeakMemory", "release_freed_memory", "rss_mb"]

_STATUS = Path("/proc/self/status")
_RSS_AFTER_TRIM: float | None = None  # the reference: resident MiB after the second render since a trim
_RENDERS_SINCE_TRIM = 0
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


def release_freed_memory(every_mb: float = 64.0, every_fraction: float = 0.25) -> bool:
    """Give memory freed by renders back to the OS (glibc ``malloc_trim``) once it adds up.

    Each render frees hundreds of MiB of tensors and frames; glibc keeps them in its heap
    (``tasks.allocator`` asks it to, so the next render reuses them without page faults),
    fragmented, and without trimming a long-running worker's resident set grew by about one
    video's frames per render (measured: ~630 KiB per 64x64x9 render; see docs/benchmarks.md).
    Trimming costs the next render its page faults (5-20 ms for 64x64x9, ~0.1 s for 256x256x33),
    so it runs only once the resident set is ``every_mb`` or ``every_fraction`` of its level
    (whichever is more) above its level after the second render since the last trim (or since
    the process started): the growth is bounded, the cost amortised. The first render after a
    trim is no reference: it takes its memory back from the kernel and can end 100-250 MiB below
    the renders after it (measured at 256x256x33, a ~960 MiB working set, where a reference taken
    there with a 64 MiB margin trimmed after every second render). The fraction is for large
    working sets, whose resident set moves by more than 64 MiB from render to render.
    Returns whether it trimmed. A no-op where the C library has no ``malloc_trim``.
    """
    global _RSS_AFTER_TRIM, _RENDERS_SINCE_TRIM
    rss = rss_mb()
    if rss is None:
        return False
    _RENDERS_SINCE_TRIM += 1
    if _RENDERS_SINCE_TRIM < 2:
        return False
    if _RSS_AFTER_TRIM is None:
        _RSS_AFTER_TRIM = rss
    if rss - _RSS_AFTER_TRIM < max(every_mb, every_fraction * _RSS_AFTER_TRIM):
        return False
    trim = getattr(libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    # The next render takes back its working set; the reference is the render after it, not
    # the trough right after the trim (that would trim again after almost every render).
    _RSS_AFTER_TRIM, _RENDERS_SINCE_TRIM = None, 0
    return True
