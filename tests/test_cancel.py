"""Cancelling: a queued render never starts, a running one stops at a step boundary, the model stays warm."""

from __future__ import annotations

from celery import Celery

from tasks.cancel import cancel
from tests.support import PACED, videos_in, wait_for

# 60 steps paced to at least 0.1 s each (tests/pacing.py): still running when the test cancels it.
SLOW = {"prompt": "a long render", "height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 60}


def test_cancel_running_and_queued_renders_keeps_the_model_loaded(start_worker, producer: Celery, s3, bucket):
    worker = start_worker(**PACED)
    child = worker.pool_children()[0].pid
    running = producer.send_task("tasks.render", kwargs={**SLOW, "seed": 1}, queue="render")
    queued = producer.send_task("tasks.render", kwargs={**SLOW, "seed": 2}, queue="render")
    wait_for(lambda: running.state == "PROGRESS" and (running.info or {}).get("step", 0) >= 1, 120, "denoising")

    cancel(queued.id, producer)
    cancel(running.id, producer)

    wait_for(lambda: running.state == "REVOKED", 60, "the running render to stop")
    assert type(running.info).__name__ == "TaskRevokedError"
    assert "cancelled by request during stage 'denoising'" in str(running.info)
    wait_for(lambda: queued.state == "REVOKED", 60, "the queued render to be discarded")
    assert worker.log.count(": render tiny-wan:") == 1  # the queued one never started

    after = producer.send_task("tasks.render", kwargs={"prompt": "after the cancel"}, queue="render").get(timeout=120)
    assert after["worker_pid"] == child and worker.log.count("engine loaded") == 1
    assert [o.object_name for o in videos_in(s3, bucket)] == [after["key"]]
