"""Baselines for the benchmark, on their own Celery app and queue ``bench``.

- ``bench.noop``: Celery's raw round trip, the floor of dispatch cost.
- ``bench.naive_render``: what many tutorials do: load the model inside each task, then render,
  encode and upload exactly as ``tasks.render`` does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from celery import Celery

from worker_config.settings import get_settings

app = Celery("bench")
_settings = get_settings()
app.conf.update(
    broker_url=_settings.REDIS_URL,
    result_backend=_settings.REDIS_URL,
    task_serializer="json",
    accept_content=["json"],
    task_default_queue="bench",
    task_acks_late=True,
    worker_prefetch_multiplier=1,
)


@app.task(name="bench.noop")
def noop() -> int:
    return 1


@app.task(name="bench.naive_render")
def naive_render(spec: dict[str, Any], key: str) -> dict[str, Any]:
    from tasks.engines.diffusers_engine import DiffusersEngine
    from tasks.pipeline.s5_encode import encode_mp4, sha256_file, to_uint8_frames
    from tasks.pipeline.storage import VideoStore

    settings = get_settings()
    engine = DiffusersEngine(settings)  # the naive part: a model load per task
    frames = to_uint8_frames(engine.render(spec, lambda *a: None).frames)
    engine.close()
    with tempfile.TemporaryDirectory() as tmp:
        path = encode_mp4(frames, spec["fps"], Path(tmp) / "video.mp4")
        VideoStore(settings).put(key, path, {"sha256": sha256_file(path)})
    return {"key": key}
