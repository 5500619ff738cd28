"""Stage 3, ``checking_cache``: is the video stored already? Asked while the render starts.

A render first asks storage whether its video exists already (a HEAD request). Asked before the
render, that round trip is time the GPU idles: about 3 ms on loopback, tens of ms to a remote
bucket. ``StorageLookup`` sends it from a background thread. The render meanwhile encodes the
prompt, and the answer is awaited before the first denoising step (``serve_if_stored``, called by
``s4_generate``), so a video found in storage costs at most the prompt encoding and no denoising.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from celery.utils.log import get_task_logger

from tasks.errors import StorageUnavailable
from tasks.pipeline.progress import StageClock
from tasks.pipeline.storage import StoredVideo, VideoStore
from tasks.pipeline.threads import ProcessPool

__all__ = ["StorageLookup", "ServedFromStorage", "serve_if_stored"]

log = get_task_logger("tasks.render")

_pool = ProcessPool("renderfarm-lookup", 1)  # this process's lookup thread


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


class ServedFromStorage(Exception):
    """Storage has the finished video: the render stops (before denoising) and the task returns it."""

    def __init__(self, video: StoredVideo) -> None:
        super().__init__(video.key)
        self.video = video


def serve_if_stored(lookup: StorageLookup | None, clock: StageClock) -> None:
    """Wait for storage's answer; raise ``ServedFromStorage`` if it has the finished video.

    Storage being down is not a reason to idle the GPU: the render goes ahead, waits in the
    spool, and its upload is retried. An object without our metadata is not a finished video.
    """
    if lookup is None:
        return
    try:
        hit = lookup.result()
    except StorageUnavailable as exc:
        log.warning("cannot check storage for %s, rendering anyway: %s", lookup.key, exc)
        hit = None
    if lookup.seconds is not None:
        clock.record("checking_cache", lookup.seconds)
    if hit is not None and "sha256" in hit.metadata:
        raise ServedFromStorage(hit)
