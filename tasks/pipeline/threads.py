"""Background threads a render uses, one pool per process.

A pool process of a prefork worker is forked from the main process, and threads do not survive a
fork: a pool made before it would hold threads that do not exist in the child. ``ProcessPool``
makes its executor on first use in each process (it notices a new process id).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["ProcessPool"]


class ProcessPool:
    """A ``ThreadPoolExecutor`` of ``workers`` threads named ``name``, made anew in each process."""

    def __init__(self, name: str, workers: int) -> None:
        self._name, self._workers = name, workers
        self._lock = threading.Lock()
        self._executor: tuple[int, ThreadPoolExecutor] | None = None

    def __call__(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._executor[0] != os.getpid():
                self._executor = (os.getpid(), ThreadPoolExecutor(self._workers, thread_name_prefix=self._name))
            return self._executor[1]
