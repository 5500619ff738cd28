"""One more try, then a clear error: the shape shared by the render's bounded in-process retries.

A failure that may pass (an out-of-memory after the allocator's cache is emptied; FastVideo's Ray
worker killed and its generator rebuilt) earns exactly one more attempt in the same process. The
same failure again ends the render with an error that names the request's size; any other failure
is raised as it is. Never a loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["with_one_more_try", "describe_size", "cause_of_type"]

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def with_one_more_try(
    attempt: Callable[[], T],
    worth_another: Callable[[Exception], bool],
    before_retry: Callable[[Exception], None],
    give_up: Callable[[Exception], Exception],
) -> T:
    """Run ``attempt``; if it fails with an error ``worth_another`` accepts, call ``before_retry``
    and run it once more; if that fails the same way, raise ``give_up(error)`` instead."""
    try:
        return attempt()
    except Exception as exc:
        if not worth_another(exc):
            raise
        before_retry(exc)
    try:
        return attempt()
    except Exception as exc:
        if not worth_another(exc):
            raise
        raise give_up(exc) from None


def describe_size(spec: dict[str, Any]) -> str:
    """``'512x512 x 65 frames (30 steps)'``: the size of a render, for error messages."""
    return f"{spec['width']}x{spec['height']} x {spec['num_frames']} frames ({spec['num_inference_steps']} steps)"


def cause_of_type(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of ``kind`` in ``exc``'s chain of causes (``exc`` included), if any.

    FastVideo runs the forward pass in a thread and re-raises its error as ``RuntimeError("Forward
    execution thread failed")`` from it: what happened is found further down the chain.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
