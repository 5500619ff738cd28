"""A worker shutting down, as its running render sees it: the flag, and the exception that gives the task back.

On SIGTERM (or SIGINT) to a worker's main process (Kubernetes' eviction, ``docker stop``, a spot
notice acted on) Celery begins its warm shutdown there, and tells a busy pool child nothing (the
child's copy of Celery's own state is a fork-time copy). So the main process sets ``SHUTDOWN``, a
flag in shared memory it made before its pool forked (``arm``, at ``worker_init``; ``set``, at
``worker_shutting_down``: ``tasks.worker.lifecycle``), and the render reads it at each step and
stage boundary through ``RenderStop`` (``tasks.pipeline.cancelling``), with the cancel flag: the
two reasons of one stop. A render stopped this way raises ``WorkerShuttingDown`` where it is; stage
4 saves a checkpoint there and the pipeline gives the task back to the queue
(``tasks.pipeline.render``). Past its last denoising step a render finishes instead.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SHUTDOWN", "ShutdownFlag", "WorkerShuttingDown"]


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

    def __init__(self, stage: str | None, step: int | None = None) -> None:
        where = f"after denoising step {step}" if step is not None else f"before {stage or 'the render'}"
        super().__init__(f"the worker is shutting down (stopped {where})")
        self.stage, self.step = stage, step
