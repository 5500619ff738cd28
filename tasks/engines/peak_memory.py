"""Peak memory of one render: CUDA where torch renders on a GPU, else the process's resident set.

On Linux the resident-set high-water mark (VmHWM) can be reset by writing ``5`` to
``/proc/self/clear_refs``, so the peak is the render's own, not the process's lifetime peak.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["PeakMemory", "rss_mb"]

_STATUS = Path("/proc/self/status")
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
