"""The storage lookup of a render, run while the render starts.

A render first asks storage whether its video exists already (a HEAD request). Asked before the
render, that round trip is time the GPU idles: about 3 ms on loopback, tens of ms to a remote
bucket. ``StorageLookup`` sends it from a background thread. The render meanwhile encodes the
prompt, and the answer is awaited before the first denoising step (``tasks.render``), so a video
found in storage costs at most the prompt encoding and no denoising.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from tasks.storage import StoredVideo, VideoStore

__all__ = ["StorageLookup"]

_lock = threading.Lock()
_executor: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """This process's lookup thread (a forked child starts its own: threads do not survive a fork)."""
    global _executor
    with _lock:
        if _executor is None or _executor[0] != os.getpid():
            _executor = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="renderfarm-lookup"))
        return _executor[1]


class StorageLookup:
    """``store.find(key)``, started now in the background."""

    def __init__(self, store: VideoStore, key: str) -> None:
        self.key = key
        self.seconds: float | None = None  # how long storage took to answer, once it has
        self._started = time.perf_counter()
        self._future: Future[StoredVideo | None] = _pool().submit(self._find, store, key)

    def _find(self, store: VideoStore, key: str) -> StoredVideo | None:
        try:
            return store.find(key)
        finally:
            self.seconds = time.perf_counter() - self._started

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> StoredVideo | None:
        """Wait for the answer (the storage client's own timeout bounds it); raises what ``find`` raised."""
        return self._future.result()
