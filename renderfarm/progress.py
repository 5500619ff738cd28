"""Waiting for a render while reporting its progress: a callback, or a progress bar on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["wait_for_render", "describe"]

ProgressCallback = Callable[[str, dict[str, Any]], None]


def describe(state: str, info: dict[str, Any] | None) -> str:
    """One short line for a task state: ``denoising 3/8``, ``uploading``, ``queued``."""
    if state == "PENDING":
        return "queued"
    if state == "STARTED":
        return "started"
    if state == "PROGRESS" and info:
        stage = str(info.get("stage", "working")).replace("_", " ")
        return f"{stage} {info['step']}/{info['steps']}" if info.get("steps") else stage
    return state.lower()


def wait_for_render(
    result: Any,
    timeout: float = 3600.0,
    on_progress: ProgressCallback | None = None,
    show_bar: bool | None = None,
    poll_interval: float = 0.1,
) -> dict[str, Any]:
    """Wait for ``result`` (an ``AsyncResult``) and return its value.

    ``on_progress(state, info)`` is called on every change of state or step. With ``show_bar``
    (default: when stderr is a terminal) a rich progress bar shows the stage and step. Raises
    ``TimeoutError`` after ``timeout`` seconds and the task's own error if it failed.
    """
    show_bar = sys.stderr.isatty() if show_bar is None else show_bar
    deadline = time.monotonic() + timeout
    bar = _Bar() if show_bar else None
    last: tuple[str, Any] | None = None
    try:
        while not result.ready():
            state, info = result.state, result.info
            info = info if isinstance(info, dict) else {}
            if (state, info) != last:
                last = (state, info)
                if on_progress:
                    on_progress(state, info)
                if bar:
                    bar.update(state, info)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"render {result.id} did not finish within {timeout:.0f}s (last state: {describe(*last)})"
                )
            time.sleep(poll_interval)
        value = result.get(timeout=max(1.0, deadline - time.monotonic()))
        if on_progress:
            on_progress("SUCCESS", {})
        return value  # type: ignore[no-any-return]
    finally:
        if bar:
            bar.close()


class _Bar:
    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=False
        )
        self._task = self._progress.add_task("queued", total=None)
        self._progress.start()

    def update(self, state: str, info: dict[str, Any]) -> None:
        steps = info.get("steps")
        self._progress.update(
            self._task, description=describe(state, info), total=steps or None, completed=info.get("step") or 0
        )

    def close(self) -> None:
        self._progress.stop()
