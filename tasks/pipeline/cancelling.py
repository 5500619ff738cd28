"""A running render's side of cancelling (``tasks.cancel``): whether it must stop, and how it ends.

``RenderStop`` is the one question the stages ask, "is this render being stopped?": at every
denoising step and at each stage boundary (the engine's progress callback in ``s4_generate``: before
``decoding`` too; the pipeline before ``encoding`` and ``uploading``). Its answer comes from a
``CancelWatch``, a thread that reads the task's cancel flag every 0.5 s, so asking costs a step
nothing and a Redis that is slow or away never holds up a render. A cancel seen raises
``RenderCancelled`` with the ``StopPoint`` reached. The second reason to stop is the worker
shutting down (``tasks.pipeline.stopping``: a flag in memory shared with the main process): it
raises ``WorkerShuttingDown`` at a step or a stage boundary before the render's last denoising step
is done, and never after it (decoding, encoding and the upload take seconds: the render finishes).

``RenderCancelled`` is also raised at admission (``s2_admit``: a task cancelled while it waited).
The pipeline (``tasks.pipeline.render``) catches it and ends the task with ``mark_revoked``:
``REVOKED`` with the point's reason, a ``task-revoked`` event; the pool process keeps its model
for the next task. Buffer mode's background upload asks the flag once more itself
(``cancel_requested``) before it starts, and ends the same way (``s7_upload``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from tasks.cancel import CANCEL_KEY, StopPoint
from tasks.pipeline.events import render_cancelled
from tasks.pipeline.stopping import SHUTDOWN, ShutdownFlag, WorkerShuttingDown

__all__ = ["CancelWatch", "RenderCancelled", "RenderStop", "cancel_requested", "mark_revoked"]

log = logging.getLogger("renderfarm.cancel")


class RenderCancelled(Exception):
    """Raised inside the render when the producer cancelled this task; ``point``: where it stopped
    (None at admission: the pipeline names the stage it was in)."""

    def __init__(self, point: StopPoint | None = None) -> None:
        super().__init__(point.reason() if point else "cancelled by request")
        self.point = point


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


class RenderStop:
    """Whether this render must stop, and why (cancelled, or its worker shutting down), asked at each
    step and stage boundary; a context manager around the whole render (its ``CancelWatch`` runs inside it)."""

    def __init__(
        self, client: Any, task_id: str | None, every_s: float = 0.5, shutdown: ShutdownFlag = SHUTDOWN
    ) -> None:  # fmt: skip
        self._watch = CancelWatch(client, task_id, every_s)
        self._shutdown = shutdown
        self._stage: str | None = None
        self.finishing = False  # past the last denoising step: a shutdown no longer stops it

    def __enter__(self) -> RenderStop:
        self._watch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._watch.__exit__(*exc)

    def requested(self) -> bool:
        return self._watch.requested()

    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def check(self, stage: str, step: int | None = None, steps: int | None = None) -> None:
        """Raise ``RenderCancelled`` if the render must stop here: before ``stage`` when it is a new
        one (no work of it done yet), else at ``step`` of ``steps`` within it; ``WorkerShuttingDown``
        the same way while the worker shuts down, until the last denoising step is done."""
        entering, self._stage = stage != self._stage, stage
        if stage in _AFTER_DENOISING or (stage == "denoising" and step is not None and steps and step >= steps):
            self.finishing = True
        if self._watch.requested():
            if entering:
                raise RenderCancelled(StopPoint(stage, before=True))
            raise RenderCancelled(StopPoint(stage, step, steps))
        if self._shutdown.is_set() and not self.finishing:
            raise WorkerShuttingDown(stage, None if entering and stage != "denoising" else step)


_AFTER_DENOISING = frozenset({"decoding", "encoding", "uploading"})


def mark_revoked(task: Any, request: Any, point: StopPoint) -> None:
    """End a cancelled render: ``REVOKED`` with the point's reason, ``render_cancelled`` (the metrics),
    and the final event monitors (Flower) need (a task that ends by ``Ignore``, or whose upload ran
    in the background, sends none). ``request`` is the task's, kept by whichever thread ends it."""
    task.backend.mark_as_revoked(request.id, reason=point.reason(), request=request)
    render_cancelled.send(sender=task, task_id=request.id)
    if not task.app.conf.worker_send_task_events:
        return
    try:
        with task.app.events.default_dispatcher(hostname=request.hostname) as dispatcher:
            dispatcher.send("task-revoked", uuid=request.id, terminated=False, signum=None, expired=False)
    except Exception as exc:  # noqa: BLE001 - the state in the result backend is what counts
        log.warning("could not send the task-revoked event of %s: %s", request.id, exc)
