"""The pool process's memory between renders: freed memory is given back to the OS once it adds up.

``release_freed_memory`` runs after each render's frames are encoded and dropped (the pipeline's
``render_encoded`` signal, connected by ``install``). A render's own peak memory is
measured where it runs (``tasks.engines.peak_memory``).
"""

from __future__ import annotations

from typing import Any

from tasks.engines.peak_memory import rss_mb
from tasks.pipeline.events import render_encoded
from tasks.worker.allocator import libc

__all__ = ["install", "release_freed_memory", "rss_mb"]

_RSS_AFTER_TRIM: float | None = None  # the reference: resident MiB after the second render since a trim
_RENDERS_SINCE_TRIM = 0


def release_freed_memory(every_mb: float = 64.0, every_fraction: float = 0.25) -> bool:
    """Give memory freed by renders back to the OS (glibc ``malloc_trim``) once it adds up.

    Each render frees hundreds of MiB of tensors and frames; glibc keeps them in its heap
    (``tasks.worker.allocator`` asks it to, so the next render reuses them without page faults),
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


def _after_render(**_: Any) -> None:
    release_freed_memory()


def install(app: Any) -> None:
    """Trim after each render's encoding, in the pool process that rendered it."""
    render_encoded.connect(_after_render, weak=False)
