"""Should this render stop now, and why: the one question a running render asks at each step.

Two reasons, one answer (``RenderStop``), read from memory at a step boundary, never from Redis:

- its producer **cancelled** it (``tasks.cancel``; the flag is watched from a thread by
  ``CancelWatch``): ``RenderCancelled``, the task ends ``REVOKED`` and the model stays loaded;
- its worker is **shutting down** (SIGTERM to the worker's main process: Kubernetes' eviction,
  ``docker stop``, a spot notice): ``WorkerShuttingDown``, the render saves a checkpoint where it
  stopped and its task goes back to the queue at once (``tasks.pipeline.render``). A render whose
  last denoising step is done finishes instead: decoding, encoding and the upload take seconds,
  and another worker would have to decode again.

The shutdown flag is shared memory (``SHUTDOWN``), made by the worker's main process before its
pool forks (``arm``) and set there when Celery's warm shutdown begins (``tasks.worker.lifecycle``):
Celery tells a busy pool child nothing, and the child's copy of Celery's own state is a
fork-time copy.
"""

from __future__ import annotations

from typing import Any

from tasks.pipeline.cancelling import CancelWatch, RenderCancelled

__all__ = ["SHUTDOWN", "ShutdownFlag", "RenderStop", "WorkerShuttingDown"]


class ShutdownFlag:
    """A flag the main process sets and every pool child reads (made before they fork)."""

    def __init__(self) -> None:
        self._value: Any = None

    def arm(self) -> None:
        import multiprocessing

        self._value = multiprocessing.RawValue("b", 0)

    def set(self) -> None:
        if self._value is not None:
            self._value.value = 1

    def is_set(self) -> bool:
        return self._value is not None and bool(self._value.value)


SHUTDOWN = ShutdownFlag()


class WorkerShuttingDown(Exception):
    """Raised inside the render when its worker is shutting down: the task is given back to the queue."""

    def __init__(self, step: int | None) -> None:
        super().__init__(f"the worker is shutting down (stopped after denoising step {step})")
        self.step = step


class RenderStop:
    """Should this render stop now, and why (cancelled, or its worker shutting down).

    Asked with the step just done (and the render's steps) after each denoising step, or with
    none at a stage boundary. Once the last denoising step is reported, a shutdown no longer
    stops the render (``finishing``): it finishes and is stored.
    """

    def __init__(self, watch: CancelWatch, shutdown: ShutdownFlag = SHUTDOWN) -> None:
        self._watch, self._shutdown = watch, shutdown
        self.finishing = False

    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def reason(self, step: int | None = None, steps: int | None = None) -> str | None:
        """``"cancelled"``, ``"shutdown"`` (not once the render is finishing), or None: go on."""
        if step is not None and steps is not None and step >= steps:
            self.finishing = True
        if self._watch.requested():
            return "cancelled"
        if self._shutdown.is_set() and not self.finishing:
            return "shutdown"
        return None

    def check(self, step: int | None = None, steps: int | None = None) -> None:
        """Raise the exception that stops the render here, if it should stop."""
        reason = self.reason(step, steps)
        if reason == "cancelled":
            raise RenderCancelled
        if reason == "shutdown":
            raise WorkerShuttingDown(step)
