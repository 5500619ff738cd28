"""Faults outside the worker, injected for real: storage down, Redis restarted."""

from __future__ import annotations

from celery import Celery

from tests.support import RedisServer, S3Server, free_port, minio_client, wait_for


def test_storage_down_retries_the_upload_without_rendering_again(start_worker, producer: Celery, bucket):
    port = free_port()  # nothing listens here yet: storage is down
    worker = start_worker(MINIO_ENDPOINT=f"127.0.0.1:{port}", MINIO_PUBLIC_ENDPOINT=f"127.0.0.1:{port}",
                          STORAGE_TIMEOUT_S="1")  # fmt: skip
    result = producer.send_task("tasks.render", kwargs={"prompt": "stored later", "seed": 5}, queue="render")
    wait_for(lambda: "Retry in" in worker.log, 90, "the upload to be retried")
    assert result.state in ("PENDING", "RETRY", "STARTED", "PROGRESS")
    assert "StorageUnavailable" in worker.log and f"127.0.0.1:{port}" in worker.log

    s3 = S3Server(port=port)  # storage comes back
    try:
        done = result.get(timeout=120)
        assert done["cached"] is False
        assert "denoising" not in done["timings"]  # the retry uploaded the spooled MP4, it did not render
        assert worker.log.count("found renders/") >= 1 and "in the spool from an earlier attempt" in worker.log
        objects = list(minio_client(s3).list_objects(bucket, recursive=True))
        assert [o.object_name for o in objects] == [done["key"]]
        stat = minio_client(s3).stat_object(bucket, done["key"])
        assert stat.size == done["size_bytes"]
    finally:
        s3.stop()


def test_redis_restart_loses_no_queued_task(start_worker, worker_env, tmp_path):
    redis = RedisServer(tmp_path, persistent=True)
    client = Celery("producer", broker=redis.url, backend=redis.url)
    # What a foreign producer sets to ride out a Redis restart (docs/api.md).
    client.conf.update(task_serializer="json", accept_content=["json"], result_backend_always_retry=True)
    try:
        worker = start_worker(REDIS_URL=redis.url)
        first = client.send_task("tasks.render", kwargs={"prompt": "before", "seed": 1}, queue="render").get(
            timeout=120
        )
        queued = [client.send_task("tasks.render", kwargs={"prompt": f"queued {i}", "seed": i}, queue="render")
                  for i in range(4)]  # fmt: skip

        redis.kill()  # a crash: no shutdown save, only the fsync'ed append-only file survives
        redis.start()

        results = [r.get(timeout=180) for r in queued]
        assert {r["seed"] for r in results} == {0, 1, 2, 3}
        assert first["seed"] == 1 and not any(r["key"] == first["key"] for r in results)
        after = client.send_task("tasks.render", kwargs={"prompt": "after", "seed": 9}, queue="render").get(timeout=120)
        assert after["seed"] == 9
        assert "Connection to broker lost" in worker.log or "Cannot connect to redis" in worker.log
    finally:
        client.close()
        redis.stop()
