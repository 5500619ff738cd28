"""Leases with two real workers: a slow healthy render runs once; a dead or paused node's task moves on.

Workers here use VISIBILITY_TIMEOUT_S=4 and LEASE_RENEW_S=1, so a lapsed lease is noticed within
seconds; production defaults are 300 s and 30 s (docs/reliability.md).
"""

from __future__ import annotations

import os
import signal

from celery import Celery

from tests.support import PACED, videos_in, wait_for

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
    assert len(list(videos_in(s3, bucket))) == 1


def received(result, *workers) -> int:
    return sum(w.log.count(f"Task tasks.render[{result.id}] received") for w in workers)


def test_a_task_waiting_for_its_countdown_is_never_handed_to_another_worker(start_worker, producer: Celery, s3, bucket):
    # Held in the worker's timer, unacknowledged, for three times the visibility timeout.
    workers = start_worker(**LEASE), start_worker(**LEASE)
    result = producer.send_task("tasks.render", kwargs={"prompt": "later", "seed": 4}, queue="render", countdown=12)
    done = result.get(timeout=180)
    assert received(result, *workers) == 1  # its lease never lapsed: no worker received it twice
    assert renders_started(*workers) == 1
    assert [o.object_name for o in videos_in(s3, bucket)] == [done["key"]]


def test_leases_follow_kombus_configured_key_names(start_worker, redis_server, s3, bucket):
    from tests.keyprefix import PREFIX

    prefixed = {**LEASE, "CELERY_WORKER_INCLUDE": "tests.pacing,tests.keyprefix"}
    first = start_worker(**prefixed)
    assert f"task leases ({PREFIX}unacked_index)" in first.log
    producer = Celery("producer", broker=redis_server.url, backend=redis_server.url)
    producer.conf.update(task_serializer="json", accept_content=["json"],
                         broker_transport_options={"global_keyprefix": PREFIX})  # fmt: skip
    try:
        result = producer.send_task("tasks.render", kwargs={**SLOW, "num_inference_steps": 80, "seed": 5},
                                    queue="render")  # fmt: skip
        wait_until_rendering(first)
        assert redis_server.client.zcard(f"{PREFIX}unacked_index") == 1  # kombu's index, under the prefix
        assert not redis_server.client.exists("unacked_index")
        second = start_worker(**prefixed)
        done = result.get(timeout=300)
        assert done["timings"]["total"] > 2 * 4 and done["worker"] == first.hostname
        assert received(result, first, second) == 1
    finally:
        producer.close()


def test_a_killed_node_gives_its_task_to_another_worker(start_worker, producer: Celery, s3, bucket):
    doomed = start_worker(**LEASE)
    result = producer.send_task("tasks.render", kwargs={**SLOW, "seed": 2}, queue="render")
    wait_until_rendering(doomed)
    survivor = start_worker(**LEASE)
    os.killpg(doomed.proc.pid, signal.SIGKILL)  # the node is reclaimed: no shutdown, no ack

    done = result.get(timeout=300)
    assert done["worker"] == survivor.hostname
    assert [o.object_name for o in videos_in(s3, bucket)] == [done["key"]]


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
    # The resumed worker finishes its copy, uploads it (the same key) and drops it: the first result stands.
    wait_for(lambda: f"task {result.id} already succeeded" in paused.log, 300, "the resumed worker to end its copy")

    assert renders_started(paused, other) == 2  # both rendered: the pause was real
    objects = list(videos_in(s3, bucket))
    assert [o.object_name for o in objects] == [done["key"]]  # the same key: still one object
    stored = s3.stat_object(bucket, done["key"])
    assert stored.metadata["x-amz-meta-sha256"] == done["sha256"]  # seeded: both copies are the same bytes
    final = producer.AsyncResult(result.id)
    assert final.state == "SUCCESS" and final.result["worker"] == other.hostname
    assert f"Task tasks.render[{result.id}] succeeded" not in paused.log  # no second SUCCESS reported
