"""The FastVideo engine on CPU, on tiny-wan, inside real prefork workers (run in .venv-fastvideo).

    make test-fastvideo      # .venv-fastvideo/bin/python -m pytest tests/test_fastvideo*.py

Skipped where fastvideo is not importable (the main .venv): see scripts/install-fastvideo.sh.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from celery import Celery

from tests.fastvideo_support import (
    build_poisoned_tiny_wan,
    fastvideo_workers,
    session_processes,
    stop_leaves_nothing,
    wait_gone,
)
from tests.support import download_verified, videos_in, wait_for, wait_for_denoising

try:
    import fastvideo  # noqa: F401
except ImportError:
    pytest.skip(
        "fastvideo is not installed in this venv: run scripts/install-fastvideo.sh, then "
        ".venv-fastvideo/bin/python -m pytest tests/test_fastvideo*.py",
        allow_module_level=True,
    )

pytestmark = pytest.mark.timeout(600)

SMALL = {"prompt": "a red fox running through snow", "height": 48, "width": 80, "num_frames": 13, "fps": 12, "seed": 3}
SLOW = {"prompt": "a slow render", "height": 128, "width": 128, "num_frames": 33, "num_inference_steps": 60, "seed": 11}
FV = {"ENGINE": "fastvideo"}


def test_render_through_the_queue_with_fastvideo_on_cpu(
    start_worker, worker_env, producer: Celery, s3, bucket, tmp_path
):
    # imageio-ffmpeg made unusable: FastVideo's MP4s are written by this farm's encoder (tasks/engines/fastvideo_mp4.py)
    worker = start_worker(IMAGEIO_FFMPEG_EXE="/bin/false", **FV)
    assert "Multiprocessing OK: [2, 4, 6]" in worker.log  # a spawn pool inside the pool child itself
    assert "CUDA available: False" in worker.log and "/dev/shm: " in worker.log
    assert "Device: cpu (DEVICE=auto)" in worker.log  # tiny-wan: the CPU is allowed
    # The render's own hand-over path, proven at start: a tensor from a spawned process (shared memory on CPU).
    assert "Tensor hand-over: cpu tensor from a spawned process, through shared memory" in worker.log
    assert "FastVideo CPU-compatibility layer applied" in worker.log
    [fv_worker] = fastvideo_workers(worker)  # FastVideo's mp executor: one spawned worker per GPU
    # The allocator settings of the pool child reach the process that renders (tasks/worker/allocator.py).
    assert {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"} <= set(fv_worker.environ())

    first = producer.send_task("tasks.render", kwargs=SMALL, queue="render").get(timeout=180)
    second = producer.send_task("tasks.render", kwargs={**SMALL, "seed": 4}, queue="render").get(timeout=180)

    assert first["engine"] == "fastvideo" and first["model"] == "tiny-wan" and first["cached"] is False
    assert (first["width"], first["height"], first["num_frames"], first["fps"]) == (80, 48, 13, 12)
    stream = download_verified(first, tmp_path / "video.mp4")  # size and sha256 match the result
    assert first["poster_key"] == first["key"].removesuffix(".mp4") + ".jpg"  # from the MP4 FastVideo wrote
    assert stream["codec_name"] == "h264"
    assert (stream["width"], stream["height"], int(stream["nb_read_frames"])) == (80, 48, 13)
    assert stream["avg_frame_rate"] == "12/1" and stream["pix_fmt"] == "yuv420p"
    head = (tmp_path / "video.mp4").read_bytes()[:4096]
    assert head.find(b"moov") < head.find(b"mdat") or b"mdat" not in head  # faststart, as encode_mp4 writes

    # Loaded once: both renders in the same pool child, through the same FastVideo worker.
    assert first["worker_pid"] == second["worker_pid"] and worker.log.count("engine loaded") == 1
    assert [p.pid for p in fastvideo_workers(worker)] == [fv_worker.pid]
    assert sorted(o.object_name for o in videos_in(s3, bucket)) == sorted([first["key"], second["key"]])
    # FastVideo wrote the MP4 in its private directory; the task moved it out: nothing left behind.
    assert list(Path(worker_env["SPOOL_DIR"]).rglob("*.mp4")) == []

    stop_leaves_nothing(worker)


def test_pool_child_killed_mid_render_takes_its_fastvideo_worker_along(start_worker, producer: Celery, s3, bucket):
    worker = start_worker(**FV)
    [child] = worker.pool_children()
    [fv_worker] = fastvideo_workers(worker)
    result = producer.send_task("tasks.render", kwargs=SLOW, queue="render")
    wait_for_denoising(result)
    os.kill(child.pid, signal.SIGKILL)

    wait_gone([fv_worker.pid], timeout=10)  # PR_SET_PDEATHSIG: it dies with its pool child
    done = result.get(timeout=300)
    assert done["worker_pid"] != child.pid and done["engine"] == "fastvideo"
    assert worker.log.count("engine loaded") == 2
    assert [o.object_name for o in videos_in(s3, bucket)] == [done["key"]]
    assert len(fastvideo_workers(worker)) == 1  # only the replacement child's


def test_hard_time_limit_kills_the_child_and_its_fastvideo_worker(start_worker, producer: Celery):
    worker = start_worker(RENDER_SOFT_TIME_LIMIT_S="10", RENDER_TIME_LIMIT_S="11", **FV)
    [child] = worker.pool_children()
    [fv_worker] = fastvideo_workers(worker)
    slow = {**SLOW, "height": 256, "width": 256, "num_frames": 65, "num_inference_steps": 200}
    result = producer.send_task("tasks.render", kwargs=slow, queue="render")
    wait_for_denoising(result)

    with pytest.raises(Exception) as info:
        result.get(timeout=300)
    assert type(info.value).__name__ in ("TimeLimitExceeded", "RenderTimeout")
    wait_gone([fv_worker.pid], timeout=30)
    assert not psutil_alive(child.pid)
    wait_for(lambda: len(worker.pool_children()) == 1 and len(fastvideo_workers(worker)) == 1, 120, "a fresh child")


def test_soft_time_limit_rebuilds_the_generator_and_the_child_keeps_serving(start_worker, producer: Celery):
    worker = start_worker(RENDER_SOFT_TIME_LIMIT_S="5", RENDER_TIME_LIMIT_S="300", **FV)
    [child] = worker.pool_children()
    [fv_worker] = fastvideo_workers(worker)
    slow = {**SLOW, "height": 256, "width": 256, "num_frames": 65, "num_inference_steps": 200}
    with pytest.raises(Exception, match="soft time limit of 5s") as info:
        producer.send_task("tasks.render", kwargs=slow, queue="render").get(timeout=300)
    assert type(info.value).__name__ == "RenderTimeout"
    wait_gone([fv_worker.pid], timeout=30)  # the busy FastVideo worker was shut down, not left running

    done = producer.send_task("tasks.render", kwargs=SMALL, queue="render").get(timeout=300)
    assert done["engine"] == "fastvideo" and done["worker_pid"] == child.pid  # same child, fresh generator
    assert worker.log.count("engine loaded") == 1 and "rebuilding the generator" in worker.log
    assert len(fastvideo_workers(worker)) == 1


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def poisoned_model(model_cache: Path) -> Path:
    from tasks.engines.tiny_wan import tiny_wan_path

    return build_poisoned_tiny_wan(tiny_wan_path(model_cache), model_cache / "tiny-wan-poisoned")


def test_sigquit_from_fastvideo_worker_ends_the_child_and_the_delivery_cap_ends_the_task(
    start_worker, producer: Celery, poisoned_model: Path
):
    # A local checkpoint is a real model to the worker: on this CPU it must be asked for (no silent fallback).
    worker = start_worker(MODEL_ID=str(poisoned_model), DEVICE="cpu", MAX_DELIVERIES="2", **FV)
    session = worker.proc.pid
    poison = producer.send_task("tasks.render", kwargs={**SMALL, "prompt": "0123456789 xyz"}, queue="render")

    with pytest.raises(Exception, match=r"delivered 3 times .* giving up after MAX_DELIVERIES=2") as info:
        poison.get(timeout=400)
    assert type(info.value).__name__ == "DeliveryLimitExceeded"
    log = worker.log
    assert "IndexError: index out of range in self" in log  # the real fault, inside FastVideo's worker
    assert log.count("got SIGQUIT: FastVideo's worker process failed") == 2  # each delivery's child got it
    assert log.count("WorkerLostError('Worker exited prematurely") == 2  # and exited; Celery saw it go
    assert log.count("engine loaded") == 3  # and was replaced, loading the model again
    # Only the current child and its FastVideo worker remain: the dead children left no orphans.
    wait_for(lambda: len(worker.pool_children()) == 1 and len(fastvideo_workers(worker)) == 1, 60, "a settled pool")
    descendants = {p.pid for p in worker.descendants()} | {worker.proc.pid}
    strays = [p for p in session_processes(session) if p.pid not in descendants]
    assert strays == []
