"""Leases with two real workers: a slow healthy render runs once; a dead or paused node's task moves on.

Workers here use VISIBILITY_TIMEOUT_S=4 and LEASE_RENEW_S=1, so a lapsed lease is noticed within
seconds; production defaults are 300 s and 30 s (docs/reliability.md).
"""

from __future__ import annotations

import os
import signal

from celery import Celery

from tests.support import PACED, wait_for

LEASE = {"VISIBILITY_TIMEOUT_S": "4", "LEASE_RENEW_S": "1", **PACED}
# 150 steps paced to at least 0.1 s each: a render of 15 s or more on any CPU.
SLOW = {"prompt": "a long healthy render", "height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 150}


def renders_started(*workers) -> int:
    return sum(w.log.count(": render tiny-wan:") for w in workers)


def wait_until_rendering(worker, timeout: float = 120) -> None:
    wait_for(lambda: ": render tiny-wan:" in worker.log, timeout, f"{worker.name} to start rendering")


def test_a_slow_healthy_render_is_never_started_twice(start_worker, producer: Celery, s3, bucket):
    first = start_worker(**LEASE)
    result = producer.send_task("tasks.render", kwargs={**SLOW, "seed": 1}, queue="render")
    wait_until_rendering(first)
    second = start_worker(**LEASE)  # idle, sweeping for lapsed leases every second

    done = result.get(timeout=300)
    assert done["timings"]["total"] > 3 * 4  # it outlived the visibility timeout several times over
    assert done["worker"] == first.hostname
    assert renders_started(first, second) == 1
    assert result.id not in second.log  # its lease never lapsed: the sweeping worker never received it
    assert len(list(s3.list_objects(bucket, recursive=True))) == 1


def test_a_killed_node_gives_its_task_to_another_worker(start_worker, producer: Celery, s3, bucket):
    doomed = start_worker(**LEASE)
    result = producer.send_task("tasks.render", kwargs={**SLOW, "seed": 2}, queue="render")
    wait_until_rendering(doomed)
    survivor = start_worker(**LEASE)
    os.killpg(doomed.proc.pid, signal.SIGKILL)  # the node is reclaimed: no shutdown, no ack

    done = result.get(timeout=300)
    assert done["worker"] == survivor.hostname
    assert [o.object_name for o in s3.list_objects(bucket, recursive=True)] == [done["key"]]


def test_a_paused_node_that_resumes_leaves_one_object_and_one_result(start_worker, producer: Celery, s3, bucket):
    paused = start_worker(**LEASE)
    result = producer.send_task("tasks.render", kwargs={**SLOW, "seed": 3}, queue="render")
    wait_until_rendering(paused)
    other = start_worker(**LEASE)
    os.killpg(paused.proc.pid, signal.SIGSTOP)  # Vast.ai pauses the instance
    try:
        done = result.get(timeout=300)  # the other worker took over once the lease lapsed
        assert done["worker"] == other.hostname
    finally:
        os.killpg(paused.proc.pid, signal.SIGCONT)  # ... and resumes it
    wait_for(lambda: ": done in" in paused.log, 300, "the resumed worker to finish its copy")

    assert renders_started(paused, other) == 2  # both rendered: the pause was real
    objects = list(s3.list_objects(bucket, recursive=True))
    assert [o.object_name for o in objects] == [done["key"]]  # the same key: still one object
    stored = s3.stat_object(bucket, done["key"])
    assert stored.metadata["x-amz-meta-sha256"] == done["sha256"]  # seeded: both copies are the same bytes
    final = producer.AsyncResult(result.id)
    assert final.state == "SUCCESS" and final.result["key"] == done["key"]
