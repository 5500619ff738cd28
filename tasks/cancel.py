"""Cancelling renders without killing the warm model process.

``cancel(task_id)`` revokes the task (a queued task is then discarded by whichever worker receives
it) and raises a flag in Redis (``CANCEL_KEY``) that a running render checks at every denoising
step (``tasks.pipeline.cancelling``): it stops at the next step boundary, its state becomes
``REVOKED`` with the reason, and the pool process keeps its model loaded for the next task.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CANCEL_KEY", "cancel"]

CANCEL_KEY = "renderfarm:cancel:{task_id}"
_FLAG_TTL_S = 7 * 24 * 3600  # longer than any task waits in a queue


def cancel(task_id: str, app: Any = None) -> None:
    """Ask for ``task_id`` to be cancelled, queued or running."""
    if app is None:
        from tasks.celery import app
    app.backend.client.set(CANCEL_KEY.format(task_id=task_id), "1", ex=_FLAG_TTL_S)
    app.control.revoke(task_id)
