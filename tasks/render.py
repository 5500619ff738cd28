"""The ``tasks.render`` task: validate, look in storage, render, encode, upload, report.

Retry is declared here (transient errors: backoff with a cap); invalid requests and timeouts
are final. A task whose worker died on every delivery fails for good after ``MAX_DELIVERIES``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from tasks.cancel import CANCEL_KEY, CancelWatch
from tasks.celery import app
from tasks.errors import (
    DeliveryLimitExceeded,
    EngineWorkerLost,
    InvalidRequest,
    RenderError,
    RenderOutOfMemory,
    RenderTimeout,
    StorageUnavailable,
    TransientError,
)
from tasks.keys import RenderSpec, object_key, resolve
from tasks.lookup import StorageLookup
from tasks.memory import PeakMemory, release_freed_memory
from tasks.oom import with_one_oom_retry
from tasks.progress import PUBLISHER, StageClock
from tasks.schemas import Limits, RenderRequest, RenderResult, parse_request
from tasks.spool import Spool, SpooledVideo
from tasks.storage import StoredVideo, VideoStore
from worker_config.events import render_stored
from worker_config.settings import get_settings

__all__ = ["render"]

log = get_task_logger(__name__)
_settings = get_settings()


class RenderTask(Task):
    """Holds the per-process storage client and spool (created on first use in the worker)."""

    @cached_property
    def store(self) -> VideoStore:
        return VideoStore(get_settings())

    @cached_property
    def spool(self) -> Spool:
        return Spool(get_settings().SPOOL_DIR)

    @cached_property
    def limits(self) -> Limits:
        s = get_settings()
        return Limits(max_prompt_chars=s.MAX_PROMPT_CHARS, max_pixel_frames=s.MAX_PIXEL_FRAMES, models=(s.MODEL_ID,))


@app.task(
    bind=True,
    base=RenderTask,
    name="tasks.render",
    autoretry_for=(TransientError,),
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
    max_retries=_settings.STORAGE_MAX_RETRIES,
    throws=(InvalidRequest, DeliveryLimitExceeded, RenderTimeout, RenderOutOfMemory, EngineWorkerLost),
)
def render(self: RenderTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Render a video from a text prompt; return where the MP4 is (see ``RenderResult``)."""
    if args:
        raise InvalidRequest(
            f"invalid render request: tasks.render takes keyword arguments only, got {len(args)} positional; "
            "send kwargs={'prompt': ...}"
        )
    clock = StageClock(self)
    try:
        return _render(self, clock, kwargs)
    except RenderCancelled:
        clock.close()  # no PROGRESS lands after REVOKED
        reason = f"cancelled by request during stage {clock.stage!r}"
        log.info("%s; the model stays loaded", reason)
        self.backend.mark_as_revoked(self.request.id, reason=reason, request=self.request)
        raise Ignore() from None
    except SoftTimeLimitExceeded:
        limit = get_settings().RENDER_SOFT_TIME_LIMIT_S
        raise RenderTimeout(
            f"render stopped: it ran past the soft time limit of {limit}s (RENDER_SOFT_TIME_LIMIT_S) "
            f"during stage {clock.stage!r}; ask for fewer frames, steps or pixels"
        ) from None
    finally:
        clock.close()  # no PROGRESS lands after the final state Celery writes


class RenderCancelled(Exception):
    """Raised from the progress callback when the producer cancelled this task."""


def _render(task: RenderTask, clock: StageClock, kwargs: dict[str, Any]) -> dict[str, Any]:
    clock.enter("validating")
    request = parse_request(kwargs)
    spec = resolve(request, get_settings().MODEL_ID, task.request.id or "local", task.limits)
    key = object_key(spec)
    with _delivery(task):
        log.info("render %s: %dx%d x%d frames, %d steps, seed %d -> %s", spec["model"], spec["width"],
                 spec["height"], spec["num_frames"], spec["num_inference_steps"], spec["seed"], key)  # fmt: skip
        return _render_admitted(task, clock, request, spec, key)


def _render_admitted(
    task: RenderTask, clock: StageClock, request: RenderRequest, spec: RenderSpec, key: str
) -> dict[str, Any]:
    # Storage is asked whether the video exists while the render starts; its answer is awaited
    # before the first denoising step (see tasks/lookup.py).
    lookup = None if request.force else StorageLookup(task.store, key)
    try:
        video = task.spool.find(key)
        if video is None:
            video = _render_to_spool(task, clock, spec, key, lookup)
        else:
            _serve_if_stored(lookup, clock)
            log.info("found %s in the spool from an earlier attempt; uploading it without rendering again", key)
    except ServedFromStorage as hit:
        log.info("served from storage: %s", key)
        return _result(task, hit.video, clock, cached=True)

    if get_settings().WORKER_MODE == "buffer" and task.request.id is not None:
        _hand_over_upload(task, clock, key, video)  # the next render starts while this one uploads
        raise Ignore()
    clock.enter("uploading")
    stored = task.store.put(key, video.path, video.metadata)
    task.spool.discard(key)
    return _result(task, stored, clock, cached=False)


def _hand_over_upload(task: RenderTask, clock: StageClock, key: str, video: SpooledVideo) -> None:
    """Buffer mode: upload in the background, then store SUCCESS; the task itself returns now.

    If storage fails, the task is sent again (same id, one more retry) with Celery's countdown:
    the normal path finds the MP4 in the spool and retries the upload with backoff.
    """
    from tasks.uploader import UPLOADER

    request = task.request  # this task's context, kept for the background thread
    size = video.path.stat().st_size
    result = _result(task, StoredVideo(key=key, size_bytes=size, metadata=video.metadata), clock, cached=False)

    def upload() -> None:
        started = time.perf_counter()
        try:
            task.store.put(key, video.path, video.metadata)
        except StorageUnavailable as exc:
            PUBLISHER.settle(request.id)  # no PROGRESS of this task after its final state
            _upload_failed(task, request, exc)
            return
        task.spool.discard(key)
        seconds = time.perf_counter() - started
        result["timings"]["uploading"] = round(seconds, 4)
        PUBLISHER.settle(request.id)
        task.backend.store_result(request.id, result, states.SUCCESS, request=request)
        render_stored.send(sender=task, task_id=request.id, kwargs=request.kwargs, result=result)
        log.info("uploaded %s in %.2fs (background)", key, seconds)

    clock.enter("uploading")  # seen while the upload runs (sent in the background, like every update)
    clock.hand_over()  # the upload's thread writes the final state; this thread waits for nothing
    UPLOADER.submit(upload)
    log.info("rendered in %.2fs; upload of %s handed to the background", result["timings"]["total"], key)


def _upload_failed(task: RenderTask, request: Any, exc: StorageUnavailable) -> None:
    settings = get_settings()
    if request.retries >= settings.STORAGE_MAX_RETRIES:
        log.error("giving up on %s after %d retries: %s", request.id, request.retries, exc)
        task.backend.mark_as_failure(request.id, exc, request=request)
        return
    countdown = min(120, 2 * 2**request.retries)
    log.warning("background upload failed (%s); task %s sent again in %ds to upload from the spool", exc,
                request.id, countdown)  # fmt: skip
    task.signature_from_request(request, countdown=countdown, retries=request.retries + 1).apply_async()


class ServedFromStorage(Exception):
    """Storage has the finished video: the render stops (before denoising) and the task returns it."""

    def __init__(self, video: StoredVideo) -> None:
        super().__init__(video.key)
        self.video = video


def _serve_if_stored(lookup: StorageLookup | None, clock: StageClock) -> None:
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


def _render_to_spool(
    task: RenderTask, clock: StageClock, spec: RenderSpec, key: str, lookup: StorageLookup | None
) -> SpooledVideo:
    from tasks.video import encode_mp4, sha256_file, to_uint8_frames
    from worker_config.lifecycle import ENGINE

    engine = ENGINE.get()
    watch = CancelWatch(task.backend.client, task.request.id)

    def progress(stage: str, step: int | None, steps: int | None) -> None:
        nonlocal lookup
        if step is not None and watch.requested():
            raise RenderCancelled
        # Engines report denoising step 0 before their first step: storage must have answered by then.
        if lookup is not None and (stage == "denoising" or lookup.done()):
            answered, lookup = lookup, None
            _serve_if_stored(answered, clock)
        clock.progress(stage, step, steps)

    peak = PeakMemory(engine.device)
    peak.start()
    output = with_one_oom_retry(lambda: engine.render(spec, progress), spec, engine.device)
    peak_mb, memory_source = peak.stop()
    _serve_if_stored(lookup, clock)  # still unanswered only if the engine never reported a denoising step
    clock.enter("encoding")
    path = task.spool.video_path(key)
    if output.video_path is not None:
        os.replace(output.video_path, path)
    else:
        if output.frames is None:
            raise RenderError(f"engine {engine.name} returned neither frames nor a video file")
        frames = to_uint8_frames(output.frames)
        del output
        expected = (spec["num_frames"], spec["height"], spec["width"], 3)
        if frames.shape != expected:
            raise RenderError(f"engine {engine.name} returned frames shaped {frames.shape}, expected {expected}")
        encode_mp4(frames, spec["fps"], path)
        del frames
    release_freed_memory()
    metadata = {
        "sha256": sha256_file(path),
        "width": str(spec["width"]),
        "height": str(spec["height"]),
        "num-frames": str(spec["num_frames"]),
        "fps": str(spec["fps"]),
        "seed": str(spec["seed"]),
        "model": spec["model"],
        "engine": engine.name,
    }
    if peak_mb is not None and memory_source is not None:
        metadata.update({"peak-memory-mb": str(peak_mb), "memory-source": memory_source})
    return task.spool.commit(key, metadata)


@contextmanager
def _delivery(task: RenderTask) -> Iterator[None]:
    """Count this delivery while it runs (see ``_admit``). A delivery that returns or raises an
    ordinary exception in this process is not one its worker died in: its count is cleared, so
    only deaths add up and a producer may send the same request again under the same task id.
    ``SystemExit``/``KeyboardInterrupt`` (billiard turns SIGQUIT/SIGTERM into SystemExit, and
    FastVideo's worker sends SIGQUIT when it fails) mean the process is dying: the count stays."""
    name = _admit(task)
    try:
        yield
    except Exception:
        _clear_delivery(task, name)
        raise
    _clear_delivery(task, name)


def _clear_delivery(task: RenderTask, name: str) -> None:
    try:
        task.backend.client.delete(name)
    except Exception as exc:  # noqa: BLE001 - the count expires on its own; never mask the outcome
        log.debug("could not clear the delivery count %s: %s", name, exc)


def _admit(task: RenderTask) -> str:
    """One round trip: stop if the task was cancelled; count this delivery and fail for good once
    its worker died during too many of them. Returns the counter's key."""
    settings = get_settings()
    limit = settings.MAX_DELIVERIES
    name = f"renderfarm:deliveries:{task.request.id}:{task.request.retries}"
    ttl = (settings.RENDER_TIME_LIMIT_S + settings.VISIBILITY_TIMEOUT_S) * (limit + 1)
    pipe = task.backend.client.pipeline(transaction=False)
    pipe.exists(CANCEL_KEY.format(task_id=task.request.id)).incr(name).expire(name, ttl)
    cancelled, count, _ = pipe.execute()
    if cancelled:
        raise RenderCancelled
    if count > limit:
        raise DeliveryLimitExceeded(
            f"task {task.request.id} was delivered {count} times and its worker process died during each of "
            f"the previous {count - 1} (crash, out-of-memory kill or lost node); giving up after "
            f"MAX_DELIVERIES={limit}. Check the worker logs for the cause."
        )
    return name


def _result(task: RenderTask, video: StoredVideo, clock: StageClock, cached: bool) -> dict[str, Any]:
    meta = video.metadata
    timings = clock.timings()
    result = RenderResult(
        bucket=task.store.bucket,
        key=video.key,
        url=task.store.presign(video.key),
        url_expires_s=int(task.store.expires.total_seconds()),
        size_bytes=video.size_bytes,
        sha256=meta["sha256"],
        width=int(meta["width"]),
        height=int(meta["height"]),
        num_frames=int(meta["num-frames"]),
        fps=int(meta["fps"]),
        seed=int(meta["seed"]),
        model=meta["model"],
        engine=meta["engine"],
        cached=cached,
        worker=task.request.hostname or "local",
        worker_pid=os.getpid(),
        timings=timings,
        peak_memory_mb=None if cached or "peak-memory-mb" not in meta else float(meta["peak-memory-mb"]),
        memory_source=None if cached else meta.get("memory-source"),
    )
    log.info("done in %.2fs (cached=%s): %s", timings["total"], cached, video.key)
    return result.model_dump()
