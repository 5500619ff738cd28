"""Heap trimming policy and peak-memory measurement of one process."""

from __future__ import annotations

import numpy as np

from tasks import memory


class CountingLibc:
    def __init__(self) -> None:
        self.trims = 0

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


def test_heap_is_trimmed_once_freed_memory_adds_up_not_after_every_render(monkeypatch):
    libc = CountingLibc()
    readings = iter([500, 520, 563, 565, 480, 520, 543, 545])  # resident MiB after successive renders
    monkeypatch.setattr(memory, "_LIBC", libc)
    monkeypatch.setattr(memory, "_RSS_AFTER_TRIM", None)
    monkeypatch.setattr(memory, "rss_mb", lambda: next(readings))

    trimmed = [memory.release_freed_memory(every_mb=64) for _ in range(8)]
    # 500 (the first render) sets the reference; 565 is 65 above it: trim. The first render after
    # the trim (480, its working set taken back) sets the next reference; 545 is 65 above it.
    assert trimmed == [False, False, False, True, False, False, False, True]
    assert libc.trims == 2


def test_peak_memory_of_a_render_is_its_own_high_water_mark():
    peak = memory.PeakMemory("cpu")
    peak.start()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
    mb, source = peak.stop()
    del block
    assert source == "rss" and mb is not None and mb >= (memory.rss_mb() or 0) + 32
