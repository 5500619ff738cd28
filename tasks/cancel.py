"""Cancelling renders without killing the warm model process.

``cancel(task_id)`` revokes the task (a queued task is then discarded by whichever worker receives
it) and raises a flag in Redis that a running render checks at every denoising step: it stops at
the next step boundary, its state becomes ``REVOKED`` with the reason, and the pool process keeps
its model loaded for the next task.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["CANCEL_KEY", "CancelWatch", "cancel", "cancel_requested"]

CANCEL_KEY = "renderfarm:cancel:{task_id}"
_FLAG_TTL_S = 7 * 24 * 3600  # longer than any task waits in a queue


def cancel(task_id: str, app: Any = None) -> None:
    """Ask for ``task_id`` to be cancelled, queued or running."""
    if app is None:
        from tasks.celery import app
    app.backend.client.set(CANCEL_KEY.format(task_id=task_id), "1", ex=_FLAG_TTL_S)
    app.control.revoke(task_id)


def cancel_requested(client: Any, task_id: str | None) -> bool:
    return bool(task_id) and bool(client.exists(CANCEL_KEY.format(task_id=task_id)))


class CancelWatch:
    """Checks the cancel flag of one running task, at most every ``every_s`` seconds.

    A render's steps can be milliseconds apart (tiny-wan on a CPU) or seconds apart (a real model on
    a GPU); checking Redis at each step would add a round trip per step to the former.
    """

    def __init__(self, client: Any, task_id: str | None, every_s: float = 0.5) -> None:
        self._client, self._task_id, self._every = client, task_id, every_s
        self._next = 0.0

    def requested(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._every
        return cancel_requested(self._client, self._task_id)
