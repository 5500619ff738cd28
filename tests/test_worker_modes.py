"""WORKER_MODE and pool recycling, with real workers."""

from __future__ import annotations

import os
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from celery import Celery

from tests.support import SlowS3Proxy, free_port, videos_in, wait_for
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

    assert sorted(o.object_name for o in videos_in(s3, bucket)) == sorted(r["key"] for r in results)
    assert all(r["timings"]["uploading"] >= 1.5 for r in results)  # the uploads really were slow
    assert stages[-1] == "uploading"  # shown while the upload ran in the background, then SUCCESS
    # The result, written before the upload ended, names the poster and spritesheet stored with the video.
    for result in results:
        for field in ("poster_key", "spritesheet_key"):
            assert result[field] and s3.stat_object(bucket, result[field]).content_type == "image/jpeg", field
    log = worker.log
    # The second render started before the first upload finished: the GPU did not wait on I/O.
    assert logged_at(log, "seed 1 -> ") < logged_at(log, f"uploaded {results[0]['key']}")
    assert logged_at(log, "seed 2 -> ") < logged_at(log, f"uploaded {results[1]['key']}")


def test_queue_mode_acknowledges_only_after_the_upload(start_worker, producer: Celery, slow_storage, s3, bucket):
    worker = start_worker(WORKER_MODE="queue", MINIO_ENDPOINT=slow_storage.endpoint)
    results = render_three(producer)

    assert len(list(videos_in(s3, bucket))) == 3
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
    assert sorted(o.object_name for o in videos_in(s3, bucket)) == sorted([first["key"], second["key"]])
    assert first["peak_memory_mb"] > 50 and first["memory_source"] == "rss"


def test_buffer_mode_giving_up_on_storage_is_a_failure_the_webhook_and_the_metrics_see(
    start_worker, producer: Celery, worker_env
):
    from tests.test_monitoring import scrape, value
    from tests.test_webhooks import SECRET, Receiver, check_signature

    hook, port, dead = Receiver(), free_port(), f"127.0.0.1:{free_port()}"  # nothing listens there: storage down
    try:
        worker = start_worker(
            WORKER_MODE="buffer", MINIO_ENDPOINT=dead, MINIO_PUBLIC_ENDPOINT=dead, STORAGE_TIMEOUT_S="1",
            STORAGE_MAX_RETRIES="0", METRICS_PORT=str(port), WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOWED_HOSTS="127.0.0.1:*",
        )  # fmt: skip
        result = producer.send_task(
            "tasks.render", kwargs={"prompt": "never stored", "webhook_url": hook.url}, queue="render"
        )
        with pytest.raises(Exception) as info:
            result.get(timeout=120)
        assert type(info.value).__name__ == "StorageUnavailable" and dead in str(info.value)
        assert "giving up on" in worker.log
        wait_for(lambda: hook.deliveries, 60, "the render.failed webhook")
        payload = check_signature(*hook.deliveries[0])
        assert payload["event"] == "render.failed" and payload["error"]["type"] == "StorageUnavailable"
        wait_for(lambda: value(scrape(port), "renderfarm_renders_total", outcome="storage") == 1, 30, "the metric")
        spool = Path(worker_env["SPOOL_DIR"])
        assert [p for p in spool.iterdir() if p.is_file()] == []  # nothing will come back for it
    finally:
        hook.close()


def test_a_buffer_mode_retry_on_another_host_renders_the_video_again(
    start_worker, producer: Celery, s3, bucket, tmp_path
):
    dead = f"127.0.0.1:{free_port()}"
    first = start_worker(
        WORKER_MODE="buffer", MINIO_ENDPOINT=dead, MINIO_PUBLIC_ENDPOINT=dead, STORAGE_TIMEOUT_S="1",
        SPOOL_DIR=str(tmp_path / "first-host"),
    )  # fmt: skip
    result = producer.send_task("tasks.render", kwargs={"prompt": "moves host", "seed": 8}, queue="render")
    wait_for(lambda: "sent again in" in first.log, 120, "the failed upload to send the task again")
    assert first.stop() == 0  # the first host goes away with the video in its spool
    assert list((tmp_path / "first-host").glob("*.mp4"))
    second = start_worker(SPOOL_DIR=str(tmp_path / "second-host"))  # healthy storage, an empty spool
    done = result.get(timeout=180)
    assert done["worker"] == second.hostname and "denoising" in done["timings"]  # rendered again here
    assert "in the spool from an earlier attempt" not in second.log
    assert [o.object_name for o in videos_in(s3, bucket)] == [done["key"]]


def test_the_spool_forgets_what_nothing_will_come_back_for(start_worker, worker_env):
    spool = Path(worker_env["SPOOL_DIR"])
    spool.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that is no more
    old_video, old_meta = spool / ("0" * 64 + ".mp4"), spool / ("0" * 64 + ".json")
    fresh_video, fresh_meta = spool / ("1" * 64 + ".mp4"), spool / ("1" * 64 + ".json")
    orphan = spool / f"{'2' * 64}.mp4.{gone.pid}.part"
    for path in (old_video, old_meta, fresh_video, fresh_meta, orphan):
        path.write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    for path in (old_video, old_meta):
        os.utime(path, (two_days_ago, two_days_ago))

    worker = start_worker(SPOOL_MAX_AGE_S="86400")
    assert sorted(p.name for p in spool.iterdir() if p.is_file()) == sorted([fresh_video.name, fresh_meta.name])
    assert "spool: removed 3 stale file(s)" in worker.log
