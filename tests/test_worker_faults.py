"""Worker faults with real processes: load failures, bad settings, a child killed mid-render, poison tasks."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from celery import Celery

from tests.support import PACED, render_too_big_for, uncap, videos_in, wait_for, wait_for_denoising

# Workers that must catch a render mid-way are started with PACED: 40 steps of at least 0.1 s each.
SLOW = {"prompt": "a slow render", "height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 40, "seed": 11}
# The render that follows a time-limit test runs under the same short limits: the smallest there is,
# so that a loaded machine (CI beside other jobs) finishes it well inside them.
QUICK = {"prompt": "quick", "height": 64, "width": 64, "num_frames": 5, "num_inference_steps": 1}


def test_a_worker_whose_model_fails_to_load_exits_and_loses_no_task(start_worker, producer: Celery, redis_server):
    queued = producer.send_task("tasks.render", kwargs={"prompt": "waiting"}, queue="render")
    worker = start_worker(wait=False, MODEL_ID="/nonexistent/checkpoint", ENGINE="diffusers", DEVICE="cpu")
    assert worker.proc.wait(60) == 1
    assert "FATAL: the engine failed to load" in worker.log
    assert "MODEL_ID=/nonexistent/checkpoint" in worker.log
    assert "The worker stops instead of taking tasks it cannot run." in worker.log
    assert ": render " not in worker.log  # no task was started
    assert queued.state == "PENDING"
    # The task is still in Redis (queued, or restored from the unacked set), ready for a healthy worker.
    healthy = start_worker()
    assert queued.get(timeout=120)["worker"] == healthy.hostname


def test_invalid_settings_stop_the_worker_with_the_variable_named(start_worker):
    worker = start_worker(wait=False, DISTRIBUTED_EXECUTOR_BACKEND="threads")
    assert worker.proc.wait(60) != 0
    assert "DISTRIBUTED_EXECUTOR_BACKEND (got 'threads'): Input should be 'mp' or 'ray'" in worker.log
    assert "engine loaded" not in worker.log


def test_pool_child_killed_mid_render_is_replaced_and_the_task_completes_once(
    start_worker, producer: Celery, s3, bucket
):
    worker = start_worker(**PACED)
    first_child = worker.pool_children()[0].pid
    result = producer.send_task("tasks.render", kwargs=SLOW, queue="render")
    wait_for_denoising(result)
    os.kill(first_child, signal.SIGKILL)

    done = result.get(timeout=180)
    assert done["worker_pid"] != first_child
    assert worker.log.count("engine loaded") == 2  # the replacement child loaded the model again
    assert "WorkerLostError" in worker.log or "Process 'ForkPoolWorker-1' pid:" in worker.log
    assert [o.object_name for o in videos_in(s3, bucket)] == [done["key"]]
    assert done["cached"] is False


# SIGKILL: the kernel ends the child (out-of-memory kill, crash). SIGQUIT: billiard turns it into
# SystemExit inside the child, which unwinds the task's own code first; FastVideo's worker sends it
# to its owner when it fails. Either way the child died during the delivery, and that must count.
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGQUIT], ids=["SIGKILL", "SIGQUIT"])
def test_a_task_that_kills_its_worker_every_time_fails_after_the_delivery_cap(
    start_worker, producer: Celery, sig: signal.Signals
):
    worker = start_worker(MAX_DELIVERIES="2", **PACED)
    poison = producer.send_task("tasks.render", kwargs=SLOW, queue="render")
    for delivery in range(2):
        # This delivery has begun (and is counted) before its child is killed: the task's state may
        # still be the previous delivery's PROGRESS, so that alone does not say the new child has it.
        wait_for(lambda n=delivery: worker.log.count(": render ") == n + 1, 60, f"delivery {delivery + 1}")
        wait_for_denoising(poison)
        child = worker.pool_children()[0].pid
        os.kill(child, sig)
        # One look at the pool per poll: between two looks the killed child can be reaped before its replacement starts.
        wait_for(lambda c=child: any(p.pid != c for p in worker.pool_children()), 60, "a new child")
        wait_for(lambda n=delivery: worker.log.count("engine loaded") == n + 2, 60, "the new child's engine")

    with pytest.raises(Exception, match=r"delivered 3 times .* giving up after MAX_DELIVERIES=2") as info:
        poison.get(timeout=120)
    assert type(info.value).__name__ == "DeliveryLimitExceeded"
    # The queue keeps flowing.
    assert producer.send_task("tasks.render", kwargs={"prompt": "next"}, queue="render").get(timeout=120)["key"]


def test_soft_time_limit_stops_the_render_with_a_clear_error(start_worker, producer: Celery, s3, bucket):
    # 200 paced steps last at least 20 s: the 4 s limit ends the render while it denoises, even on a
    # machine so loaded that encoding the prompt took over a second (it did, with a 1 s limit).
    worker = start_worker(RENDER_SOFT_TIME_LIMIT_S="4", RENDER_TIME_LIMIT_S="60", **PACED)
    child = worker.pool_children()[0].pid
    slow = producer.send_task("tasks.render", kwargs={**SLOW, "num_inference_steps": 200}, queue="render")
    with pytest.raises(Exception, match=r"ran past the soft time limit of 4s \(RENDER_SOFT_TIME_LIMIT_S\)") as info:
        slow.get(timeout=120)
    assert type(info.value).__name__ == "RenderTimeout"
    assert "during stage 'denoising'" in str(info.value)
    # The pool process survived, kept its model, and serves the next request.
    after = producer.send_task("tasks.render", kwargs=QUICK, queue="render").get(timeout=120)
    assert after["worker_pid"] == child and worker.log.count("engine loaded") == 1
    assert [o.object_name for o in videos_in(s3, bucket)] == [after["key"]]


def test_out_of_memory_is_retried_once_then_fails_naming_the_size(start_worker, producer: Celery):
    worker = start_worker()
    child = worker.pool_children()[0]
    render_too_big_for(child, producer)  # the pool process's address space capped: a large render cannot fit
    assert worker.log.count("freeing memory and trying once more") == 1  # one bounded retry, no loop

    uncap(child)
    after = producer.send_task("tasks.render", kwargs={"prompt": "fits"}, queue="render").get(timeout=120)
    assert after["worker_pid"] == child.pid


def test_hard_time_limit_replaces_a_hung_pool_process(start_worker, producer: Celery):
    # The soft limit also bounds the next render, the first of a freshly loaded pool process (its
    # first pass is slower): 3 s was too short for it on a loaded machine.
    worker = start_worker(RENDER_SOFT_TIME_LIMIT_S="8", RENDER_TIME_LIMIT_S="12", **PACED)
    hung = worker.pool_children()[0]
    result = producer.send_task("tasks.render", kwargs=SLOW, queue="render")
    wait_for_denoising(result)
    hung_tree = [hung, *hung.children(recursive=True)]
    hung.send_signal(signal.SIGSTOP)  # hung in native code: the soft limit cannot interrupt it

    with pytest.raises(Exception) as info:
        result.get(timeout=120)
    assert type(info.value).__name__ == "TimeLimitExceeded"
    wait_for(lambda: "Hard time limit (12" in worker.log, 30, "the hard time limit to be logged")
    # The hung process is gone, a fresh one with the model took its place, and nothing else is left.
    wait_for(lambda: not psutil.pid_exists(hung.pid) or hung.status() == psutil.STATUS_ZOMBIE, 30, "the kill")
    wait_for(lambda: worker.log.count("engine loaded") == 2, 120, "the replacement to load the model")
    alive = {p.pid for p in worker.descendants()}
    assert not alive & {p.pid for p in hung_tree}  # no process of the hung one's tree is left
    assert [p.pid for p in worker.pool_children()] != [hung.pid]
    after = producer.send_task("tasks.render", kwargs=QUICK, queue="render").get(timeout=120)
    assert after["worker_pid"] != hung.pid
