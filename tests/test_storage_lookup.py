"""The storage lookup runs while the render starts: the prompt is encoded while storage answers,
no denoising step runs before it has, and a video found in storage is served without denoising.

Storage sits behind a proxy that holds every HEAD request (the lookup) for 2 s, so the order of
events is unmistakable on any machine.
"""

from __future__ import annotations

import time

import pytest
from celery import Celery

from tests.support import SlowS3Proxy, videos_in

HELD_S = 2.0
SMALL = {"height": 48, "width": 48, "num_frames": 5, "num_inference_steps": 2}


@pytest.fixture
def slow_lookups(s3_server):
    proxy = SlowS3Proxy(s3_server.port, delay_s=HELD_S, methods=("HEAD",))
    yield proxy
    proxy.stop()


def render_watched(producer: Celery, **kwargs) -> tuple[dict, list[tuple[str, float]]]:
    """Send a render; return its result and the stages it published, each with when it was seen."""
    seen: list[tuple[str, float]] = []

    def on_message(meta: dict) -> None:
        if meta["status"] == "PROGRESS":
            seen.append((meta["result"]["stage"], time.monotonic()))

    sent = producer.send_task("tasks.render", kwargs={**SMALL, **kwargs}, queue="render")
    return sent.get(timeout=120, on_message=on_message), seen


def test_the_prompt_is_encoded_while_storage_answers_and_denoising_waits(
    start_worker, producer: Celery, slow_lookups, s3, bucket
):
    start_worker(MINIO_ENDPOINT=slow_lookups.endpoint)
    result, seen = render_watched(producer, prompt="overlap", seed=1)

    assert result["cached"] is False
    [answered] = [at for method, path, at in slow_lookups.held if method == "HEAD" and result["key"] in path]
    encoding = [at for stage, at in seen if stage == "encoding_prompt"]
    denoising = [at for stage, at in seen if stage == "denoising"]
    assert encoding and encoding[0] < answered  # the render started before storage answered
    assert denoising and denoising[0] >= answered  # ... and no denoising step ran before it had
    assert result["timings"]["checking_cache"] >= HELD_S  # the lookup's own time, run alongside
    assert [o.object_name for o in videos_in(s3, bucket)] == [result["key"]]


def test_a_video_found_in_storage_is_served_without_denoising(start_worker, producer: Celery, slow_lookups):
    worker = start_worker(MINIO_ENDPOINT=slow_lookups.endpoint)
    first, _ = render_watched(producer, prompt="twice", seed=2)
    again, seen = render_watched(producer, prompt="twice", seed=2)

    assert again["cached"] is True and again["key"] == first["key"] and again["sha256"] == first["sha256"]
    assert "denoising" not in again["timings"] and "denoising" not in {stage for stage, _ in seen}
    assert f"served from storage: {first['key']}" in worker.log


def test_force_renders_without_asking_storage(start_worker, producer: Celery, slow_lookups):
    start_worker(MINIO_ENDPOINT=slow_lookups.endpoint)
    first, _ = render_watched(producer, prompt="forced", seed=3)

    def video_lookups() -> int:  # HEADs of the video's own key (a checkpoint's lookup is another key's)
        return sum(method == "HEAD" and first["key"] in path for method, path, _ in slow_lookups.held)

    heads = video_lookups()
    again, _ = render_watched(producer, prompt="forced", seed=3, force=True)

    assert again["cached"] is False and again["key"] == first["key"]
    assert heads == 1 and video_lookups() == heads and "checking_cache" not in again["timings"]
