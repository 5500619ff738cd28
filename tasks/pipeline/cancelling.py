"""A running render's side of cancelling (``tasks.cancel``): the flag it checks, and how it stops.

``RenderCancelled`` is raised where the render finds the flag: at admission (``s2_admit``, a task
cancelled while it waited) or at a denoising step (``s4_generate``, through ``CancelWatch``). The
pipeline (``tasks.pipeline.render``) catches it, marks the task ``REVOKED`` with the stage it
reached, and the pool process keeps its model for the next task.
"""

from __future__ import annotations

import time
from typing import Any

from tasks.cancel import CANCEL_KEY

__all__ = ["RenderCancelled", "CancelWatch", "cancel_requested"]


class RenderCancelled(Exception):
    """Raised inside the render when the producer cancelled this task."""


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
