"""Hostile requests through the real queue: a clear error each, no model time, the worker keeps serving."""

from __future__ import annotations

import time

import pytest
from celery import Celery

from tests.support import wait_for

HOSTILE = [
    ({"prompt": 123}, "prompt: Input should be a valid string"),
    ({"prompt": "x", "height": -16}, "height: Input should be greater than or equal to 16"),
    ({"prompt": "x", "width": 100}, "width: Input should be a multiple of 16"),
    ({"prompt": "x", "num_frames": 10_000}, "num_frames: Input should be less than or equal to 257"),
    ({"prompt": "x", "num_frames": 8}, "num_frames: Wan needs a frame count of the form 4k+1"),
    ({"prompt": "x" * 3_000_000}, "prompt: String should have at most 100000 characters"),
    ({"prompt": "x" * 5000}, "prompt: 5000 characters; at most 2000 are allowed"),
    ({"prompt": "bell\x07"}, "prompt: prompt contains control character '\\x07'"),
    ({"prompt": "x", "steps": 4}, "steps: unknown field; allowed fields:"),
    ({"prompt": "x", "model": "stabilityai/some-other-model"}, "model: 'stabilityai/some-other-model' is not served"),
    ({"prompt": "x", "height": 1920, "width": 1920, "num_frames": 257}, "(MAX_PIXEL_FRAMES)"),
]


def test_hostile_requests_fail_fast_and_the_worker_keeps_serving(start_worker, producer: Celery):
    worker = start_worker()
    child = worker.pool_children()[0].pid
    for kwargs, expected in HOSTILE:
        started = time.monotonic()
        result = producer.send_task("tasks.render", kwargs=kwargs, queue="render")
        with pytest.raises(Exception) as info:
            result.get(timeout=30)
        assert type(info.value).__name__ == "InvalidRequest", kwargs
        assert expected in str(info.value), (kwargs, str(info.value))
        assert result.state == "FAILURE"
        assert time.monotonic() - started < 10
    # None of them reached the model: no render was started, nothing was retried.
    assert "render tiny-wan:" not in worker.log
    assert "Retry in" not in worker.log

    good = producer.send_task("tasks.render", kwargs={"prompt": "still serving"}, queue="render").get(timeout=120)
    assert good["worker_pid"] == child and [p.pid for p in worker.pool_children()] == [child]


def test_positional_arguments_are_rejected(start_worker, producer: Celery):
    start_worker()
    result = producer.send_task("tasks.render", args=["a cat"], queue="render")
    with pytest.raises(Exception, match=r"takes keyword arguments only, got 1 positional") as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "InvalidRequest"


def test_a_pickled_message_is_refused_and_never_runs(start_worker, producer: Celery, s3, bucket):
    worker = start_worker()
    producer.send_task("tasks.render", kwargs={"prompt": "pickled"}, queue="render", serializer="pickle")
    wait_for(lambda: "Refusing to deserialize untrusted content of type pickle" in worker.log, 30, "the refusal")
    good = producer.send_task("tasks.render", kwargs={"prompt": "json is fine"}, queue="render").get(timeout=120)
    assert [o.object_name for o in s3.list_objects(bucket, recursive=True)] == [good["key"]]
    assert worker.log.count("render tiny-wan:") == 1
