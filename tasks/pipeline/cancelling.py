"""A running render's side of cancelling (``tasks.cancel``): the flag it checks, and how it stops.

``RenderCancelled`` is raised where the render finds the flag: at admission (``s2_admit``, a task
cancelled while it waited) or at a denoising step (``s4_generate``, through ``CancelWatch``). The
pipeline (``tasks.pipeline.render``) catches it, marks the task ``REVOKED`` with the stage it
reached, and the pool process keeps its model for the next task.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from tasks.cancel import CANCEL_KEY

__all__ = ["RenderCancelled", "CancelWatch", "cancel_requested"]

log = logging.getLogger("renderfarm.cancel")


class RenderCancelled(Exception):
    """Raised inside the render when the producer cancelled this task."""


def cancel_requested(client: Any, task_id: str | None) -> bool:
    return bool(task_id) and bool(client.exists(CANCEL_KEY.format(task_id=task_id)))


class CancelWatch:
    """Watches the cancel flag of one running task from a background thread, every ``every_s`` seconds.

    The render's thread only reads the outcome (``requested()``): a check costs a denoising step
    nothing, whether steps are milliseconds apart (tiny-wan on a CPU) or seconds (a GPU), and Redis
    being slow or away never pauses or fails the render. While Redis cannot be reached the watch
    says so once, renders on, and keeps checking; a cancel sent during the outage is seen once
    Redis is back. Use it as a context manager around the render.
    """

    def __init__(self, client: Any, task_id: str | None, every_s: float = 0.5) -> None:
        self._client, self._task_id, self._every = client, task_id, every_s
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="renderfarm-cancel-watch", daemon=True)

    def __enter__(self) -> CancelWatch:
        if self._task_id:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Not joined: a check stuck on an unreachable Redis must not hold up the render's end.
        self._done.set()

    def requested(self) -> bool:
        return self._cancelled.is_set()

    def _run(self) -> None:
        unreachable = False
        while not self._done.is_set():
            try:
                if cancel_requested(self._client, self._task_id):
                    self._cancelled.set()
                    return
            except Exception as exc:  # noqa: BLE001 - Redis away: render on, check again
                if not unreachable:
                    log.warning(
                        "could not check whether task %s was cancelled (%s: %s); rendering on, checking every %.1fs",
                        self._task_id, type(exc).__name__, exc, self._every,
                    )  # fmt: skip
                unreachable = True
            else:
                if unreachable:
                    log.warning("Redis answers again: task %s was not cancelled", self._task_id)
                unreachable = False
            self._done.wait(self._every)
