"""End to end through the real queue: producer -> Redis -> prefork worker -> MP4 in S3."""

from __future__ import annotations

import io
import urllib.request

import pytest
from celery import Celery
from minio.error import S3Error
from PIL import Image

from tests.support import PACED, download_verified, videos_in

STAGE_ORDER = ["validating", "checking_cache", "encoding_prompt", "denoising", "decoding", "encoding", "uploading"]

RESULT_FIELDS = {
    "bucket", "key", "url", "size_bytes", "sha256", "width", "height", "num_frames", "fps", "seed",
    "model", "engine", "cached", "worker", "timings",
}  # fmt: skip


def test_render_through_the_queue_gives_a_playable_mp4(start_worker, producer: Celery, s3, s3_server, bucket, tmp_path):
    worker = start_worker()
    kwargs = {"prompt": "a red fox running through snow", "height": 48, "width": 80, "num_frames": 13, "fps": 12}
    async_result = producer.send_task("tasks.render", kwargs=kwargs, queue="render")
    result = async_result.get(timeout=120)

    assert RESULT_FIELDS <= set(result)
    assert (result["bucket"], result["width"], result["height"], result["num_frames"], result["fps"]) == (
        bucket, 80, 48, 13, 12,
    )  # fmt: skip
    assert result["model"] == "tiny-wan" and result["engine"] == "diffusers" and result["cached"] is False
    assert result["worker"] == worker.hostname
    assert {"validating", "denoising", "encoding", "uploading", "total"} <= set(result["timings"])
    assert "allocator: freed memory kept for the next render" in worker.log  # set before the engine loaded

    # The presigned URL is built for the public endpoint, not the internal one.
    assert result["url"].startswith(f"http://localhost:{s3_server.port}/{bucket}/{result['key']}?")
    assert result["url_expires_s"] == 86400  # PRESIGN_EXPIRES_S's default: a day
    assert f"X-Amz-Expires={result['url_expires_s']}&" in result["url"]
    stream = download_verified(result, tmp_path / "video.mp4")  # size and sha256 match the result
    assert stream["codec_name"] == "h264" and stream["pix_fmt"] == "yuv420p"
    assert (stream["width"], stream["height"], int(stream["nb_read_frames"])) == (80, 48, 13)
    assert stream["avg_frame_rate"] == "12/1"

    # Exactly three objects were written: the video under the derived key, its poster and spritesheet beside it.
    poster_key = result["key"].removesuffix(".mp4") + ".jpg"
    sheet_key = result["key"].removesuffix(".mp4") + ".sprites.jpg"
    assert sorted(o.object_name for o in s3.list_objects(bucket, recursive=True)) == sorted(
        [result["key"], poster_key, sheet_key]
    )
    # The poster: the middle frame as a JPEG of the video's size, behind a presigned URL like the video's.
    assert result["poster_key"] == poster_key and f"X-Amz-Expires={result['url_expires_s']}&" in result["poster_url"]
    with urllib.request.urlopen(result["poster_url"], timeout=30) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        poster = Image.open(io.BytesIO(response.read()))
    assert (poster.format, poster.size) == ("JPEG", (80, 48))
    # The spritesheet: nine of the 13 frames (0, 2, 3, 4, 6, 8, 9, 10, 12) in a 3x3 grid of 80x48 tiles.
    assert result["spritesheet_key"] == sheet_key
    with urllib.request.urlopen(result["spritesheet_url"], timeout=30) as response:
        sheet = Image.open(io.BytesIO(response.read()))
    assert (sheet.format, sheet.size) == ("JPEG", (240, 144))
    # The bucket is private (no policy).
    with pytest.raises(S3Error) as no_policy:
        s3.get_bucket_policy(bucket)
    assert no_policy.value.code == "NoSuchBucketPolicy"


def test_engine_loads_once_per_pool_child_across_tasks(start_worker, producer: Celery):
    worker = start_worker()
    results = [
        producer.send_task("tasks.render", kwargs={"prompt": f"scene {i}", "seed": i}, queue="render").get(timeout=120)
        for i in range(4)
    ]
    pids = {r["worker_pid"] for r in results}
    assert len(pids) == 1
    assert [child.pid for child in worker.pool_children()] == list(pids)
    assert worker.log.count("engine loaded") == 1
    assert f"(pid {pids.pop()}, load #1)" in worker.log


def test_same_request_is_one_object_and_served_from_storage(start_worker, producer: Celery, s3, bucket):
    start_worker()
    kwargs = {"prompt": "a lighthouse at night", "seed": 7}
    first = producer.send_task("tasks.render", kwargs=kwargs, queue="render").get(timeout=120)
    second = producer.send_task("tasks.render", kwargs=kwargs, queue="render").get(timeout=120)
    forced = producer.send_task("tasks.render", kwargs={**kwargs, "force": True}, queue="render").get(timeout=120)

    assert first["key"] == second["key"] == forced["key"]
    assert first["poster_key"] == second["poster_key"] is not None  # served from storage: its poster too
    assert (first["cached"], second["cached"], forced["cached"]) == (False, True, False)
    assert second["sha256"] == first["sha256"] == forced["sha256"]  # seeded: the same pixels
    assert "denoising" not in second["timings"]
    assert len(list(videos_in(s3, bucket))) == 1


def test_progress_states_are_visible_to_the_producer(start_worker, producer: Celery, redis_server):
    start_worker(**PACED)  # denoising steps of 0.1 s or more: long enough to be seen
    seen: list[dict] = []
    async_result = producer.send_task(
        "tasks.render",
        kwargs={"prompt": "waves", "num_inference_steps": 6, "height": 96, "width": 96, "num_frames": 17},
        queue="render",
    )

    # Every state the worker publishes is also sent to the result backend's pub/sub channel.
    def on_message(meta: dict) -> None:
        if meta["status"] == "PROGRESS":
            seen.append(meta["result"])

    async_result.get(timeout=120, on_message=on_message, propagate=True)
    # At most one update per 0.1 s goes out, the latest winning: stages shorter than that may be
    # superseded, by a later stage or by the final state; what is seen is in order, the steps count up.
    stages = [m["stage"] for m in seen]
    assert stages == sorted(stages, key=STAGE_ORDER.index) and "denoising" in stages
    # No held-back PROGRESS overwrites the final state: the pool process's publisher sends in order,
    # so once the next render's final state is written, nothing of this one is left to send.
    after = producer.send_task("tasks.render", kwargs={"prompt": "next", "num_inference_steps": 1}, queue="render")
    after.get(timeout=120)
    assert producer.backend.get_task_meta(async_result.id, cache=False)["status"] == "SUCCESS"
    steps = [m["step"] for m in seen if m["stage"] == "denoising"]
    assert len(steps) >= 3 and steps == sorted(set(steps))
    assert all(m["steps"] == 6 for m in seen if m["stage"] == "denoising")
