"""Hostile requests through the real queue: a clear error each, no model time, the worker keeps serving."""

from __future__ import annotations

import time

import pytest
from celery import Celery

from tests.support import videos_in, wait_for

# docs/api.md's table of hostile requests, row by row: (the request as the table names it, the
# kwargs sent, the message after "invalid render request: "). tests/test_docs.py checks they agree.
HOSTILE = [
    ("no `prompt`", {}, "prompt: required"),
    ("`prompt=123`", {"prompt": 123}, "prompt: Input should be a valid string"),
    ('`prompt="   "`', {"prompt": "   "}, "prompt: prompt is blank"),
    ("`prompt` of 3 MB", {"prompt": "x" * 3_000_000}, "prompt: String should have at most 100000 characters"),
    ("`prompt` of 5000 characters", {"prompt": "x" * 5000}, "prompt: 5000 characters; at most 2000 are allowed"),
    ('`prompt="bell\\x07"`', {"prompt": "bell\x07"},
     "prompt: prompt contains control character '\\x07'; only printable text, newlines and tabs are allowed"),
    ('`prompt="pay \\u202egnp.exe"`', {"prompt": "pay \u202egnp.exe"},
     "prompt: prompt contains the invisible or bidirectional formatting character U+202E (RIGHT-TO-LEFT OVERRIDE); "
     "only printable text, newlines and tabs are allowed (zero-width joiners excepted)"),
    ("`height=-16`", {"prompt": "x", "height": -16}, "height: Input should be greater than or equal to 16"),
    ("`height=-1`", {"prompt": "x", "height": -1},
     "height: Input should be greater than or equal to 16 and a multiple of 16"),
    ("`width=100`", {"prompt": "x", "width": 100}, "width: Input should be a multiple of 16"),
    ("`height=4096`", {"prompt": "x", "height": 4096}, "height: Input should be less than or equal to 1920"),
    ('`height="480"`', {"prompt": "x", "height": "480"}, "height: Input should be a valid integer"),
    ("`num_frames=8`", {"prompt": "x", "num_frames": 8},
     "num_frames: Wan needs a frame count of the form 4k+1 (1, 5, 9, ..., 81, ...); 8 is not"),
    ("`num_frames=10000`", {"prompt": "x", "num_frames": 10_000},
     "num_frames: Input should be less than or equal to 257; Wan needs a frame count of the form 4k+1 "
     "(1, 5, 9, ..., 81, ...); 10000 is not"),
    ("`num_inference_steps=0`", {"prompt": "x", "num_inference_steps": 0},
     "num_inference_steps: Input should be greater than or equal to 1"),
    ("`num_inference_steps=10000`", {"prompt": "x", "num_inference_steps": 10_000},
     "num_inference_steps: Input should be less than or equal to 200"),
    ("`guidance_scale=NaN`", {"prompt": "x", "guidance_scale": float("nan")},
     "guidance_scale: Input should be a finite number"),
    ("`seed=-1`", {"prompt": "x", "seed": -1}, "seed: Input should be greater than or equal to 0"),
    ("`seed=2**32`", {"prompt": "x", "seed": 2**32}, "seed: Input should be less than or equal to 4294967295"),
    ("1920x1920x257", {"prompt": "x", "height": 1920, "width": 1920, "num_frames": 257},
     "size: 1920x1920 x 257 frames = 947,404,800 pixel-frames; this deployment allows at most 118,886,400 "
     "(MAX_PIXEL_FRAMES)"),
    ("`steps=4` (unknown field)", {"prompt": "x", "steps": 4},
     "steps: unknown field; allowed fields: prompt, negative_prompt, num_frames, height, width, num_inference_steps, "
     "guidance_scale, seed, fps, model, image, force, webhook_url"),
    ('`model="stabilityai/other"`', {"prompt": "x", "model": "stabilityai/other"},
     "model: 'stabilityai/other' is not served by this queue; available: tiny-wan"),
    ("`image` sent to a text-to-video model", {"prompt": "x", "image": "s3://anything/cat.png"},
     "image: tiny-wan is a text-to-video model and takes no image; models that do: tiny-wan-ti2v, "
     "Wan-AI/Wan2.2-TI2V-5B-Diffusers, FastVideo/FastWan2.2-TI2V-5B-Diffusers, "
     "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers"),
    ('`image="https://..."`', {"prompt": "x", "image": "https://example.invalid/cat.png"},
     "image: https:// URLs are not fetched; use a data:image/png|jpeg|webp;base64,... URL or "
     "s3://<this farm's bucket>/<key>"),
    ('`model="nope/none"`, `prompt` of 5000 characters, `width=100`',
     {"model": "nope/none", "prompt": "x" * 5000, "width": 100},
     "prompt: 5000 characters; at most 2000 are allowed; width: Input should be a multiple of 16; model: "
     "'nope/none' is not served by this queue; available: tiny-wan"),
    ("`height=720`, `seconds=4` (unknown field), 1280x720x257",
     {"prompt": "x", "height": 720, "width": 1280, "num_frames": 257, "seconds": 4},
     "seconds: unknown field; allowed fields: prompt, negative_prompt, num_frames, height, width, "
     "num_inference_steps, guidance_scale, seed, fps, model, image, force, webhook_url; size: 1280x720 x 257 "
     "frames = 236,851,200 pixel-frames; this deployment allows at most 118,886,400 (MAX_PIXEL_FRAMES)"),
]  # fmt: skip
POSITIONAL = (
    "positional arguments",
    "tasks.render takes keyword arguments only, got 1 positional; send kwargs={'prompt': ...}",
)


def test_hostile_requests_fail_fast_and_the_worker_keeps_serving(start_worker, producer: Celery):
    worker = start_worker()
    child = worker.pool_children()[0].pid
    for label, kwargs, expected in HOSTILE:
        started = time.monotonic()
        result = producer.send_task("tasks.render", kwargs=kwargs, queue="render")
        with pytest.raises(Exception) as info:
            result.get(timeout=30)
        assert type(info.value).__name__ == "InvalidRequest", label
        assert str(info.value) == f"invalid render request: {expected}", (label, str(info.value))
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
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "InvalidRequest"
    assert str(info.value) == f"invalid render request: {POSITIONAL[1]}"


def test_a_pickled_message_is_refused_and_never_runs(start_worker, producer: Celery, s3, bucket):
    worker = start_worker()
    pickled = producer.send_task("tasks.render", kwargs={"prompt": "pickled"}, queue="render", serializer="pickle")
    wait_for(lambda: "Refusing to deserialize untrusted content of type pickle" in worker.log, 30, "the refusal")
    good = producer.send_task("tasks.render", kwargs={"prompt": "json is fine"}, queue="render").get(timeout=120)
    assert pickled.state == "PENDING" and pickled.id not in worker.log  # never decoded, never run
    assert [o.object_name for o in videos_in(s3, bucket)] == [good["key"]]
    assert worker.log.count("render tiny-wan:") == 1
