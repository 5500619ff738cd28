"""Test helpers on top of ``renderfarm.localstack``: real servers and real worker processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from renderfarm.localstack import ROOT, RedisServer, S3Server, SlowS3Proxy, WorkerProcess, free_port, wait_for

__all__ = [
    "PACED",
    "ROOT",
    "RedisServer",
    "S3Server",
    "SlowS3Proxy",
    "TestWorker",
    "download_verified",
    "ffprobe",
    "free_port",
    "minio_client",
    "wait_for",
    "wait_for_denoising",
    "watch_events",
    "worker_environment",
    "render_too_big_for",
    "uncap",
    "videos_in",
]


def worker_environment(
    redis_url: str, minio_endpoint: str, bucket: str, model_cache: Path, work: Path, **settings: str
) -> dict[str, str]:
    """A test worker's environment: this process's without any farm setting it carries, then Redis, the
    S3 endpoint with the test credentials and ``bucket``, tiny-wan from ``model_cache``, the spool and the
    health folder under ``work``; ``settings`` add to that or replace it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "REDIS_", "MODEL_", "ENGINE"))}
    env.update(
        REDIS_URL=redis_url, MINIO_ENDPOINT=minio_endpoint, MINIO_ACCESS_KEY="test-access",
        MINIO_SECRET_KEY="test-secret", MINIO_BUCKET=bucket, MODEL_ID="tiny-wan", MODEL_CACHE_DIR=str(model_cache),
        SPOOL_DIR=str(work / "spool"), HEALTH_DIR=str(work / "health"), PYTHONUNBUFFERED="1",
    )  # fmt: skip
    env.update(settings)
    return env


# A worker started with this environment paces every render step to at least 0.1 s (tests/pacing.py),
# so renders that tests act on last long enough on any CPU. Celery reads --include from this variable.
PACED = {"CELERY_WORKER_INCLUDE": "tests.pacing", "PACE_STEP_S": "0.1"}


def wait_for_denoising(result, timeout: float = 120) -> None:
    """Until the task's state says its render is denoising (a render to act on mid-way)."""

    def denoising() -> bool:
        return result.state == "PROGRESS" and (result.info or {}).get("stage") == "denoising"

    wait_for(denoising, timeout, "the render to reach the denoising stage")


@contextlib.contextmanager
def watch_events(app: Any, handlers: dict[str, Callable[[dict], None]]) -> Iterator[None]:
    """Celery events to ``handlers`` from a background receiver, subscribed before the block runs.

    Subscribed means: a marker event this sends came back through the broker to the receiver
    (no sleep standing in for it).
    """
    marker = f"renderfarm-test-sync-{uuid.uuid4().hex}"
    synced = threading.Event()

    def on_any(event: dict) -> None:
        if event.get("type") == marker:
            synced.set()
        elif (handler := handlers.get(event.get("type", ""), handlers.get("*"))) is not None:
            handler(event)

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_any})
        listener = threading.Thread(target=receiver.capture, kwargs={"wakeup": True}, daemon=True)
        listener.start()
        try:
            with app.events.default_dispatcher() as dispatcher:
                wait_for(lambda: dispatcher.send(marker) or synced.wait(0.2), 30, "the event receiver to subscribe")
            yield
        finally:
            receiver.should_stop = True
            listener.join(10)


def render_too_big_for(process: psutil.Process, producer: Any) -> BaseException:
    """Cap ``process``'s address space a little above what it uses now and send a render that cannot
    fit; the task's ``RenderOutOfMemory`` (the cap is lifted again by ``uncap``)."""
    import pytest

    limit = process.memory_info().vms + 768 * 2**20
    subprocess.run(["prlimit", f"--pid={process.pid}", f"--as={limit}:unlimited"], check=True)  # soft limit only
    big = {"prompt": "too big", "height": 512, "width": 512, "num_frames": 65, "num_inference_steps": 1}
    with pytest.raises(
        Exception, match=r"out of memory twice on cpu rendering 512x512 x 65 frames \(1 steps\)"
    ) as info:
        producer.send_task("tasks.render", kwargs=big, queue="render").get(timeout=300)
    assert type(info.value).__name__ == "RenderOutOfMemory"
    return info.value


def uncap(process: psutil.Process) -> None:
    subprocess.run(["prlimit", f"--pid={process.pid}", "--as=unlimited"], check=True)


def videos_in(client: Any, bucket: str) -> list[Any]:
    """The MP4 objects in ``bucket`` (each video's poster JPEG beside it is left out)."""
    return [o for o in client.list_objects(bucket, recursive=True) if o.object_name.endswith(".mp4")]


def object_bytes(client: Any, bucket: str, key: str) -> bytes:
    """An object's bytes, its connection closed and released (an unreleased response leaks its socket)."""
    response = client.get_object(bucket, key)
    try:
        return response.read()  # type: ignore[no-any-return]
    finally:
        response.close()
        response.release_conn()


def minio_client(server: S3Server):
    from minio import Minio

    return Minio(server.endpoint, access_key="test-access", secret_key="test-secret", secure=False, region="us-east-1")


class TestWorker(WorkerProcess):
    """A worker with process inspection for the tests."""

    __test__ = False

    def pool_children(self) -> list[psutil.Process]:
        """The worker's direct child processes (its pool)."""
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def ffprobe(path: Path) -> dict[str, Any]:
    """The first video stream of an MP4 as ffprobe sees it, frames counted by decoding."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
         "stream=codec_name,pix_fmt,width,height,nb_read_frames,avg_frame_rate", "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)["streams"][0]  # type: ignore[no-any-return]


def download_verified(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """Download a result's MP4 through its presigned URL, check size and sha256, and ffprobe it."""
    with urllib.request.urlopen(result["url"], timeout=30) as response:
        path.write_bytes(response.read())
    assert path.stat().st_size == result["size_bytes"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == result["sha256"]
    return ffprobe(path)
