"""Background uploads for ``WORKER_MODE=buffer``: the GPU renders the next video while this one uploads.

One thread per pool process, one upload at a time, in submission order. The pool process waits
for queued uploads before it exits (``worker_process_shutdown``), so a recycled process finishes
its uploads first. A process killed outright (hard time limit, OOM kill, lost node) loses the
uploads it had queued: their MP4s stay in the spool, but their tasks were acknowledged. That is
the price of buffer mode, meant for stable hosts; ``queue`` mode acknowledges only after upload.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from celery import signals

__all__ = ["BackgroundUploader", "UPLOADER"]

log = logging.getLogger("renderfarm.uploader")


class BackgroundUploader:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[Future[None]] = set()

    def submit(self, job: Callable[[], None]) -> Future[None]:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="renderfarm-upload")
            future = self._executor.submit(job)
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)
        if (exc := future.exception()) is not None:
            log.error("background upload job failed: %s: %s", type(exc).__name__, exc)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def drain(self, timeout: float | None = None) -> None:
        """Wait for every queued upload (at process exit)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            if self._pending:
                log.info("waiting for %d background upload(s) before exiting", len(self._pending))
            executor.shutdown(wait=True)


UPLOADER = BackgroundUploader()


def _drain_at_exit(**_: Any) -> None:
    UPLOADER.drain()


signals.worker_process_shutdown.connect(_drain_at_exit, weak=False)
