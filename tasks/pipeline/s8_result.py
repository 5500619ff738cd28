"""Stage 8, the result: the JSON object ``tasks.render`` returns (``RenderResult``).

Where the video is (bucket, key, a presigned URL on the public endpoint), what it is (its hash,
size, seed, model, engine), who rendered it, the seconds per stage and the render's peak memory.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Task
from celery.utils.log import get_task_logger

from tasks.pipeline import resources
from tasks.pipeline.progress import StageClock
from tasks.pipeline.storage import StoredVideo
from tasks.schemas import RenderResult

__all__ = ["result_of"]

log = get_task_logger("tasks.render")


def result_of(task: Task, video: StoredVideo, clock: StageClock, cached: bool) -> dict[str, Any]:
    store = resources.store()
    meta = video.metadata
    timings = clock.timings()
    result = RenderResult(
        bucket=store.bucket,
        key=video.key,
        url=store.presign(video.key),
        url_expires_s=int(store.expires.total_seconds()),
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
        poster_key=video.poster_key,
        poster_url=store.presign(video.poster_key) if video.poster_key else None,
        spritesheet_key=video.spritesheet_key,
        spritesheet_url=store.presign(video.spritesheet_key) if video.spritesheet_key else None,
        image_sha256=meta.get("image-sha256"),
        image_key=meta.get("image-key"),
    )
    log.info("done in %.2fs (cached=%s): %s", timings["total"], cached, video.key)
    return result.model_dump()
