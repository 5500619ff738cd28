"""Heap trimming policy and peak-memory measurement of one process."""

from __future__ import annotations

import numpy as np

from tasks.engines.peak_memory import PeakMemory
from tasks.worker import memory


class CountingLibc:
    def __init__(self) -> None:
        self.trims = 0

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


def reset_policy(monkeypatch, readings: list[float]) -> CountingLibc:
    libc = CountingLibc()
    values = iter(readings)  # resident MiB after successive renders
    monkeypatch.setattr(memory, "libc", lambda: libc)
    monkeypatch.setattr(memory, "_RSS_AFTER_TRIM", None)
    monkeypatch.setattr(memory, "_RENDERS_SINCE_TRIM", 0)
    monkeypatch.setattr(memory, "rss_mb", lambda: next(values))
    return libc


def test_heap_is_trimmed_once_freed_memory_adds_up_not_after_every_render(monkeypatch):
    libc = reset_policy(monkeypatch, [200, 200, 220, 263, 265, 180, 200, 220, 263, 265])

    trimmed = [memory.release_freed_memory(every_mb=64) for _ in range(10)]
    # The second render (200) sets the reference; 265 is 65 above it: trim. After the trim the
    # first render (180) takes its memory back, the second (200) is the new reference; 265 trims.
    assert trimmed == [False, False, False, False, True, False, False, False, False, True]
    assert libc.trims == 2


def test_a_large_working_set_gets_a_proportional_margin(monkeypatch):
    # A 256x256x33 worker: the first render (700) ends below the ones after it.
    libc = reset_policy(monkeypatch, [700, 890, 958, 958, 1100, 1200])

    trimmed = [memory.release_freed_memory(every_mb=64, every_fraction=0.25) for _ in range(6)]
    # The reference is 890 (the second render), the margin 25% of it, 222.5 MiB: 958 and 1100
    # (210 above) are kept, 1200 (310 above) trims. With the first render as the reference, or
    # with 64 MiB alone, 958 would have trimmed.
    assert trimmed == [False, False, False, False, False, True]
    assert libc.trims == 1


def test_peak_memory_of_a_render_is_its_own_high_water_mark():
    peak = PeakMemory("cpu")
    peak.start()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
    mb, source = peak.stop()
    del block
    assert source == "rss" and mb is not None and mb >= (memory.rss_mb() or 0) + 32
