"""The body of ``tasks.render``: the stages, in the order they run.

``run`` is handed to ``tasks.render`` when a worker starts (``tasks.worker.lifecycle``). A render that
reaches a process with no engine is given back to its queue untouched (``stray``). A render goes
through ``s1_validate`` (the request), ``s2_admit`` (cancelled? delivered too often? done elsewhere?), ``s3_lookup``
(stored already? in the spool from an earlier attempt?), ``s4_generate`` (the engine), ``s5_encode``
(the MP4), ``s6_spool`` (kept until stored), ``s7_upload`` (to storage, or handed to the background
in buffer mode) and ``s8_result``; ``s9_notify`` queues its webhook once the final state is written.

A cancelled render ends ``REVOKED`` with the point it reached: a denoising step, or the boundary
before decoding, encoding or uploading (``RenderStop``, asked there; an MP4 this attempt left in
the spool is removed). The video is never half stored: an upload under way is not cut, the render
then ends ``SUCCESS``. One past its soft time limit ends with ``RenderTimeout``. One whose worker
is shutting down (``WorkerShuttingDown``, from the same ``RenderStop``: stage 4 saved a checkpoint
where it stopped) gives its message back to the queue at once with ``Reject(requeue=True)``: no
result is written, and the delivery does not count towards ``MAX_DELIVERIES`` (``s2_admit``
counts only deliveries their process died in); the next delivery continues from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from tasks.cancel import StopPoint
from tasks.engines.holder import ENGINE
from tasks.errors import RenderTimeout
from tasks.images import ConditioningImage
from tasks.pipeline import resources
from tasks.pipeline.cancelling import RenderCancelled, RenderStop, mark_revoked
from tasks.pipeline.events import render_encoded, render_handed_back
from tasks.pipeline.progress import StageClock
from tasks.pipeline.s1_validate import validate
from tasks.pipeline.s2_admit import delivery, drop_if_succeeded
from tasks.pipeline.s3_lookup import ServedFromStorage, StorageLookup, serve_if_stored
from tasks.pipeline.s4_generate import generate
from tasks.pipeline.s5_encode import encode, video_metadata, write_previews
from tasks.pipeline.s6_spool import SpooledVideo
from tasks.pipeline.s7_upload import hand_over_upload, upload
from tasks.pipeline.s8_result import result_of
from tasks.pipeline.stopping import WorkerShuttingDown
from tasks.pipeline.stray import give_back
from tasks.schemas import RenderRequest
from worker_config.settings import get_settings

__all__ = ["run"]

log = get_task_logger("tasks.render")  # the task's name: every line of a render is the task's


def run(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Render one request; return the result object (see ``RenderResult``)."""
    if not ENGINE.ready:
        give_back(task)  # not a render worker's process: back to the queue, never failed
    clock = StageClock(task)
    try:
        with RenderStop(task.backend.client, task.request.id) as stop:
            return _stages(task, clock, stop, args, kwargs)
    except RenderCancelled as cancelled:
        clock.close()  # no PROGRESS lands after REVOKED
        point = cancelled.point or StopPoint(clock.stage or "validating")
        log.info("%s; the model stays loaded", point.reason())
        mark_revoked(task, task.request, point)
        raise Ignore() from None
    except WorkerShuttingDown as stopped:
        clock.close()
        log.warning("%s during stage %r: the task goes back to the queue", stopped, clock.stage)
        queue = (task.request.delivery_info or {}).get("routing_key") or "?"
        render_handed_back.send(sender=task, queue=queue, step=stopped.step)
        raise Reject(str(stopped), requeue=True) from None
    except SoftTimeLimitExceeded:
        limit = get_settings().RENDER_SOFT_TIME_LIMIT_S
        raise RenderTimeout(
            f"render stopped: it ran past the soft time limit of {limit}s (RENDER_SOFT_TIME_LIMIT_S) "
            f"during stage {clock.stage!r}; ask for fewer frames, steps or pixels"
        ) from None
    finally:
        clock.close()  # no PROGRESS lands after the final state Celery writes


def _previews(video: Path, key: str) -> None:
    """The video's poster and spritesheet; a video without them is still stored (they are not worth a render)."""
    spool = resources.spool()
    try:
        write_previews(video, spool.poster_path(key), spool.spritesheet_path(key))
    except Exception as exc:  # noqa: BLE001 - the video is what was asked for
        log.warning("no poster or spritesheet for %s: %s: %s", video.name, type(exc).__name__, exc)


def _stages(
    task: Task, clock: StageClock, stop: RenderStop, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:  # fmt: skip
    clock.enter("validating")
    request, spec, key, image = validate(task.request.id, args, kwargs)
    with delivery(task):
        log.info("render %s: %dx%d x%d frames, %d steps, seed %d -> %s", spec["model"], spec["width"],
                 spec["height"], spec["num_frames"], spec["num_inference_steps"], spec["seed"], key)  # fmt: skip
        try:
            video, rendered = _video(task, clock, stop, request, spec, key, image)
        except ServedFromStorage as hit:
            log.info("served from storage: %s", key)
            drop_if_succeeded(task)  # another copy of this task stored it and succeeded since admission
            return result_of(task, hit.video, clock, cached=True)
        try:
            stop.check("uploading")
        except RenderCancelled:
            if rendered:  # an MP4 found from an earlier attempt may be another render's to upload
                resources.spool().discard(key)
            raise
        if get_settings().WORKER_MODE == "buffer" and task.request.id is not None:
            hand_over_upload(task, clock, key, video)  # the next render starts while this one uploads
            raise Ignore()
        stored = upload(clock, key, video)
        drop_if_succeeded(task)  # a late copy: another worker finished this task meanwhile
        return result_of(task, stored, clock, cached=False)


def _video(
    task: Task, clock: StageClock, stop: RenderStop, request: RenderRequest, spec: dict[str, Any], key: str,
    image: ConditioningImage | None,
) -> tuple[SpooledVideo, bool]:  # fmt: skip
    """The finished MP4 in the spool, and whether it was rendered now (else an earlier attempt left
    it there). ``ServedFromStorage`` when storage has it already."""
    # Storage is asked whether the video exists while the render starts; its answer is awaited
    # before the first denoising step (see s3_lookup).
    lookup = None if request.force else StorageLookup(resources.store(), key)
    video = resources.spool().find(key)
    if video is not None:
        serve_if_stored(lookup, clock)
        log.info("found %s in the spool from an earlier attempt; uploading it without rendering again", key)
        return video, False
    output, engine, memory = generate(task, clock, spec, lookup, image, stop)
    try:
        stop.check("encoding")
    except RenderCancelled:
        if output.video_path is not None:  # written by the engine (FastVideo): nobody will want it
            output.video_path.unlink(missing_ok=True)
        raise
    clock.enter("encoding")
    path = resources.spool().video_path(key)
    encode(output, engine, spec, path)
    _previews(path, key)
    # The frames are gone: the worker gives the memory they held back to the OS (tasks.worker.memory).
    render_encoded.send(sender=task)
    metadata = video_metadata(path, spec, engine, memory, image.key if image else None)
    return resources.spool().commit(key, metadata), True
