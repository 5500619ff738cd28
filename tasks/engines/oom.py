"""Out-of-memory during a render: free memory, try once more, then fail with the request's size.

A transient out-of-memory (fragmentation, another process's leftovers) often passes after the
allocator's cache is emptied; a request that is simply too big fails again at once. So: exactly
one retry, in the same process, and then ``RenderOutOfMemory`` naming the size that did not fit
(``tasks.engines.second_try``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from tasks.engines.second_try import describe_size, with_one_more_try
from tasks.errors import RenderOutOfMemory

__all__ = ["is_out_of_memory", "free_memory", "with_one_oom_retry", "first_line"]

log = logging.getLogger("renderfarm.oom")
T = TypeVar("T")

_CPU_OOM_MESSAGES = ("can't allocate memory", "out of memory", "not enough memory", "std::bad_alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out-of-memory, or an allocation failure on the CPU."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _CPU_OOM_MESSAGES)


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def with_one_oom_retry(render: Callable[[], T], spec: dict[str, Any], device: str) -> T:
    """Run ``render``; on out-of-memory free memory and run it once more; then give up clearly."""

    def before_retry(exc: Exception) -> None:
        log.warning("out of memory on %s (%s); freeing memory and trying once more", device, first_line(exc))
        free_memory()

    def give_up(exc: Exception) -> Exception:
        free_memory()
        return RenderOutOfMemory(
            f"out of memory twice on {device} rendering {describe_size(spec)}: ask for fewer pixels or frames, "
            f"or send it to a worker with more memory ({first_line(exc)})"
        )

    return with_one_more_try(render, is_out_of_memory, before_retry, give_up)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``'Type: first line of the message'`` (cut to ``limit`` characters), for one-line reports."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit]}" if text else type(exc).__name__
