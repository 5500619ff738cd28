"""``RenderStop``: one answer to "should this render stop now, and why" (tasks/pipeline/stopping.py).

The two reasons, on a real Redis (the cancel flag) and the real shutdown flag shared with a forked
process, as a worker's main process shares it with its pool; the worker-level behaviour is in
tests/test_checkpoints.py (SIGTERM) and tests/test_cancel.py.
"""

from __future__ import annotations

import multiprocessing

import pytest

from tasks.cancel import CANCEL_KEY
from tasks.pipeline.cancelling import CancelWatch, RenderCancelled
from tasks.pipeline.stopping import RenderStop, ShutdownFlag, WorkerShuttingDown
from tests.support import RedisServer, wait_for


def _set(flag: ShutdownFlag) -> None:
    flag.set()


def test_a_shutdown_stops_a_render_until_its_last_step_is_done_then_it_finishes(redis_server: RedisServer):
    flag = ShutdownFlag()
    flag.arm()  # before the fork, as the worker's main process does at worker_init
    stop = RenderStop(CancelWatch(redis_server.client, "no-such-task"), flag)
    stop.check(3, 10)
    assert stop.reason(3, 10) is None

    child = multiprocessing.get_context("fork").Process(target=_set, args=(flag,))
    child.start()
    child.join(30)
    assert flag.is_set()  # set in another process, seen here
    with pytest.raises(WorkerShuttingDown, match="after denoising step 4"):
        stop.check(4, 10)
    with pytest.raises(WorkerShuttingDown):
        stop.check()  # at a stage boundary before denoising ended
    stop.check(10, 10)  # the last step is done: the render finishes
    assert stop.finishing and stop.reason() is None  # and goes on through decoding and the upload


def test_a_cancel_stops_a_render_at_any_step_shutdown_or_not(redis_server: RedisServer):
    task_id = "a-cancelled-render"
    flag = ShutdownFlag()  # never armed: a process that is no worker never shuts down this way
    flag.set()
    assert not flag.is_set()
    with CancelWatch(redis_server.client, task_id, every_s=0.05) as watch:
        stop = RenderStop(watch, flag)
        stop.check(1, 10)
        redis_server.client.set(CANCEL_KEY.format(task_id=task_id), 1)
        wait_for(lambda: stop.reason(2, 10) == "cancelled", 10, "the cancel to be seen")
        with pytest.raises(RenderCancelled):
            stop.check(10, 10)  # also past the last step
