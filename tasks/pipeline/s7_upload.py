"""Stage 7, ``uploading``: the MP4 goes from the spool to storage.

``WORKER_MODE=queue``: ``upload`` stores it before the task returns (and is acknowledged).
``WORKER_MODE=buffer``: ``hand_over_upload`` gives it to a background thread and the task returns
at once, so the GPU renders the next video while this one uploads; the thread writes ``SUCCESS``
once the object is stored. If storage fails there, the task is sent again (same id, one more
retry) with Celery's countdown: the normal path finds the MP4 in the spool and retries the upload,
if the retry lands on this host; on another host it renders the video again (same key, same
bytes). After ``STORAGE_MAX_RETRIES`` the task fails with ``StorageUnavailable``, its
``task_failure`` signal sent (metrics, the ``render.failed`` webhook) and its spooled file removed.
Once the video is stored its spooled copy and its checkpoint (``tasks.pipeline.checkpoints``) go.

A cancel: the render checks before it uploads (``tasks.pipeline.render``), and in buffer mode the
background thread asks the cancel flag once more right before it starts the upload (the upload may
have waited behind others): a cancelled render ends ``REVOKED`` "before stage 'uploading'",
nothing stored, its MP4 dropped from the spool. Once the upload has started it is not cut: the
render ends ``SUCCESS``. A spooled MP4 is removed by the last queued upload of its key (two
identical requests back to back may share it).

The background uploads: one thread per pool process, one upload at a time, in submission order.
The pool process waits for queued uploads before it exits (``tasks.worker.lifecycle``, at
``worker_process_shutdown``), so a recycled process finishes its uploads first. A process killed
outright (hard time limit, OOM kill, lost node) loses the uploads it had queued: their MP4s stay
in the spool, but their tasks were acknowledged. That is the price of buffer mode, meant for
stable hosts; ``queue`` mode acknowledges only after upload.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from celery import Task, signals, states
from celery.utils.log import get_task_logger

from tasks.cancel import StopPoint
from tasks.errors import StorageUnavailable
from tasks.pipeline import checkpoints, resources
from tasks.pipeline.cancelling import cancel_requested, mark_revoked
from tasks.pipeline.events import render_stored
from tasks.pipeline.progress import PUBLISHER, StageClock
from tasks.pipeline.s6_spool import SpooledVideo
from tasks.pipeline.s8_result import result_of
from tasks.pipeline.storage import StoredVideo, stored_metadata
from worker_config.settings import get_settings

__all__ = ["upload", "hand_over_upload", "BackgroundUploader", "UPLOADER"]

log = logging.getLogger("renderfarm.uploader")
task_log = get_task_logger("tasks.render")


def upload(clock: StageClock, key: str, video: SpooledVideo) -> StoredVideo:
    """Queue mode: store the MP4 now, then drop it from the spool."""
    clock.enter("uploading")
    stored = resources.store().put(key, video.path, video.metadata, poster=video.poster, spritesheet=video.spritesheet)
    resources.spool().discard(key)
    _drop_checkpoint(key)
    return stored


def _drop_checkpoint(key: str) -> None:
    """The video is in storage: its denoising checkpoint is no longer needed."""
    if get_settings().CHECKPOINT_EVERY_S:
        checkpoints.discard(resources.store(), key)


class BackgroundUploader:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[Future[None]] = set()
        self._keys: Counter[str] = Counter()  # the object keys of the queued uploads

    def submit(self, job: Callable[[], None], key: str | None = None) -> Future[None]:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="renderfarm-upload")
            future = self._executor.submit(job)
            self._pending.add(future)
            if key is not None:
                self._keys[key] += 1
        future.add_done_callback(lambda done: self._done(done, key))
        return future

    def _done(self, future: Future[None], key: str | None) -> None:
        with self._lock:
            self._pending.discard(future)
            if key is not None:
                self._keys[key] -= 1
                if self._keys[key] <= 0:
                    del self._keys[key]
        if (exc := future.exception()) is not None:
            log.error("background upload job failed: %s: %s", type(exc).__name__, exc)

    def others_queued(self, key: str) -> bool:
        """Whether another queued upload (besides the one running, which asks) is of ``key``."""
        with self._lock:
            return self._keys[key] > 1

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


def hand_over_upload(task: Task, clock: StageClock, key: str, video: SpooledVideo) -> None:
    """Buffer mode: upload in the background, then store SUCCESS; the task itself returns now."""
    request = task.request  # this task's context, kept for the background thread
    size = video.path.stat().st_size
    metadata = stored_metadata(video.metadata, video.poster is not None, video.spritesheet is not None)
    result = result_of(task, StoredVideo(key=key, size_bytes=size, metadata=metadata), clock, cached=False)

    def upload_in_background() -> None:
        if _cancelled(task, request):
            PUBLISHER.settle(request.id)  # no PROGRESS of this task after its final state
            _discard(key)
            mark_revoked(task, request, StopPoint("uploading", before=True))
            task_log.info("render %s cancelled before its background upload started; nothing stored", request.id)
            return
        started = time.perf_counter()
        try:
            resources.store().put(key, video.path, video.metadata, poster=video.poster, spritesheet=video.spritesheet)
        except StorageUnavailable as exc:
            PUBLISHER.settle(request.id)  # no PROGRESS of this task after its final state
            _upload_failed(task, request, key, exc)
            return
        _discard(key)
        _drop_checkpoint(key)
        seconds = time.perf_counter() - started
        result["timings"]["uploading"] = round(seconds, 4)
        PUBLISHER.settle(request.id)
        task.backend.store_result(request.id, result, states.SUCCESS, request=request)
        render_stored.send(sender=task, task_id=request.id, kwargs=request.kwargs, result=result)
        task_log.info("uploaded %s in %.2fs (background)", key, seconds)

    clock.enter("uploading")  # seen while the upload runs (sent in the background, like every update)
    clock.hand_over()  # the upload's thread writes the final state; this thread waits for nothing
    UPLOADER.submit(upload_in_background, key)
    task_log.info("rendered in %.2fs; upload of %s handed to the background", result["timings"]["total"], key)


def _cancelled(task: Task, request: Any) -> bool:
    """Whether the render was cancelled meanwhile; if Redis cannot say, it was not (the upload goes on)."""
    try:
        return cancel_requested(task.backend.client, request.id)
    except Exception as exc:  # noqa: BLE001 - storing the video is what was asked for
        log.warning("could not check whether %s was cancelled (%s); uploading", request.id, exc)
        return False


def _discard(key: str) -> None:
    """Drop the key's MP4 from the spool, unless another queued upload (the same request sent twice) needs it."""
    if not UPLOADER.others_queued(key):
        resources.spool().discard(key)


def _upload_failed(task: Task, request: Any, key: str, exc: StorageUnavailable) -> None:
    settings = get_settings()
    if request.retries >= settings.STORAGE_MAX_RETRIES:
        task_log.error("giving up on %s after %d retries: %s", request.id, request.retries, exc)
        task.backend.mark_as_failure(request.id, exc, request=request)
        # Celery sends task_failure only for a task it runs; this one returned long ago. Its receivers
        # (the failure metric, the render.failed webhook) must see this failure all the same.
        signals.task_failure.send(
            sender=task, task_id=request.id, exception=exc, args=request.args, kwargs=request.kwargs,
            traceback=None, einfo=None,
        )  # fmt: skip
        _discard(key)  # nothing will come back for it
        return
    countdown = min(120, 2 * 2**request.retries)
    task_log.warning("background upload failed (%s); task %s sent again in %ds to upload from the spool", exc,
                     request.id, countdown)  # fmt: skip
    task.signature_from_request(request, countdown=countdown, retries=request.retries + 1).apply_async()
