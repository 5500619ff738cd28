"""WORKER_MODE and pool recycling, with real workers."""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from celery import Celery

from tests.support import SlowS3Proxy, wait_for
from worker_config.celery_config import celery_config
from worker_config.settings import Settings

_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")


def logged_at(log: str, needle: str) -> datetime:
    """The timestamp of the first log line containing ``needle``."""
    for line in log.splitlines():
        if needle in line and (match := _STAMP.match(line)):
            return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    raise AssertionError(f"no log line contains {needle!r}")


@pytest.mark.parametrize(("mode", "prefetch"), [("queue", 1), ("buffer", 2)])
def test_each_mode_sets_its_delivery_settings(mode, prefetch):
    conf = celery_config(Settings(WORKER_MODE=mode))
    assert conf["worker_prefetch_multiplier"] == prefetch
    assert conf["task_acks_late"] is True and conf["worker_concurrency"] == 1


@pytest.fixture
def slow_storage(s3_server):
    proxy = SlowS3Proxy(s3_server.port, delay_s=1.5)
    yield proxy
    proxy.stop()


def render_three(producer: Celery, stages: list[str] | None = None) -> list[dict]:
    """Three renders; the stages the first one published are appended to ``stages``."""
    sent = [
        producer.send_task("tasks.render", kwargs={"prompt": f"clip {i}", "seed": i, "num_frames": 17}, queue="render")
        for i in range(3)
    ]

    def on_message(meta: dict) -> None:
        if meta["status"] == "PROGRESS" and stages is not None:
            stages.append(meta["result"]["stage"])

    return [sent[0].get(timeout=180, on_message=on_message)] + [r.get(timeout=180) for r in sent[1:]]


def test_buffer_mode_uploads_while_the_next_video_renders(start_worker, producer: Celery, slow_storage, s3, bucket):
    worker = start_worker(WORKER_MODE="buffer", MINIO_ENDPOINT=slow_storage.endpoint)
    stages: list[str] = []
    results = render_three(producer, stages)

    assert sorted(o.object_name for o in s3.list_objects(bucket, recursive=True)) == sorted(r["key"] for r in results)
    assert all(r["timings"]["uploading"] >= 1.5 for r in results)  # the uploads really were slow
    assert stages[-1] == "uploading"  # shown while the upload ran in the background, then SUCCESS
    log = worker.log
    # The second render started before the first upload finished: the GPU did not wait on I/O.
    assert logged_at(log, "seed 1 -> ") < logged_at(log, f"uploaded {results[0]['key']}")
    assert logged_at(log, "seed 2 -> ") < logged_at(log, f"uploaded {results[1]['key']}")


def test_queue_mode_acknowledges_only_after_the_upload(start_worker, producer: Celery, slow_storage, s3, bucket):
    worker = start_worker(WORKER_MODE="queue", MINIO_ENDPOINT=slow_storage.endpoint)
    results = render_three(producer)

    assert len(list(s3.list_objects(bucket, recursive=True))) == 3
    log = worker.log
    assert logged_at(log, f"done in {results[0]['timings']['total']:.2f}s") < logged_at(log, "seed 1 -> ")
    assert "background" not in log


@pytest.mark.parametrize(
    "recycle",
    [{"WORKER_MAX_TASKS_PER_CHILD": "1"}, {"WORKER_MAX_TASKS_PER_CHILD": "0", "WORKER_MAX_MEMORY_PER_CHILD_MB": "100"}],
    ids=["by-task-count", "by-resident-memory"],
)
def test_recycled_pool_process_loads_the_model_again_and_loses_nothing(
    recycle, start_worker, producer: Celery, s3, bucket
):
    worker = start_worker(**recycle)  # a tiny-wan pool process holds ~480 MiB: over 100 MiB after any task
    first = producer.send_task("tasks.render", kwargs={"prompt": "one", "seed": 1}, queue="render").get(timeout=120)
    second = producer.send_task("tasks.render", kwargs={"prompt": "two", "seed": 2}, queue="render").get(timeout=120)

    assert first["worker_pid"] != second["worker_pid"]  # recycled between the two tasks
    wait_for(lambda: worker.log.count("engine loaded") >= 3, 60, "the third pool process to load the model")
    assert worker.log.count(": render tiny-wan:") == 2  # each rendered once
    assert sorted(o.object_name for o in s3.list_objects(bucket, recursive=True)) == sorted(
        [first["key"], second["key"]]
    )
    assert first["peak_memory_mb"] > 50 and first["memory_source"] == "rss"
