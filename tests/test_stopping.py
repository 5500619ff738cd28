"""``RenderStop``'s second reason: the worker shutting down (tasks/pipeline/stopping.py, cancelling.py).

On a real Redis (the cancel flag) and the real shutdown flag, shared with a forked process as a
worker's main process shares it with its pool. The worker-level behaviour is in
tests/test_checkpoints.py (SIGTERM) and tests/test_cancel.py.
"""

from __future__ import annotations

import multiprocessing

import pytest

from tasks.cancel import CANCEL_KEY
from tasks.pipeline.cancelling import RenderCancelled, RenderStop
from tasks.pipeline.stopping import ShutdownFlag, WorkerShuttingDown
from tests.support import RedisServer, wait_for


def _set(flag: ShutdownFlag) -> None:
    flag.set()


def test_a_shutdown_stops_a_render_until_its_last_denoising_step_then_it_finishes(redis_server: RedisServer):
    flag = ShutdownFlag()
    flag.arm()  # before the fork, as the worker's main process does at worker_init
    with RenderStop(redis_server.client, "no-such-task", shutdown=flag) as stop:
        stop.check("encoding_prompt")
        stop.check("denoising", 3, 10)

        child = multiprocessing.get_context("fork").Process(target=_set, args=(flag,))
        child.start()
        child.join(30)
        assert flag.is_set() and stop.shutting_down()  # set in another process, seen here
        with pytest.raises(WorkerShuttingDown, match="after denoising step 4"):
            stop.check("denoising", 4, 10)
        stop.check("denoising", 10, 10)  # the last step is done: the render finishes
        for stage in ("decoding", "encoding", "uploading"):
            stop.check(stage)
        assert stop.finishing

    with RenderStop(redis_server.client, "another-task", shutdown=flag) as stop:
        with pytest.raises(WorkerShuttingDown, match="before encoding_prompt"):
            stop.check("encoding_prompt")  # before any model work: given back at once


def test_a_cancel_stops_a_render_wherever_it_is_shutdown_or_not(redis_server: RedisServer):
    task_id = "a-cancelled-render"
    flag = ShutdownFlag()  # never armed: a process that is no worker never shuts down this way
    flag.set()
    assert not flag.is_set()
    with RenderStop(redis_server.client, task_id, every_s=0.05, shutdown=flag) as stop:
        stop.check("denoising", 1, 10)
        redis_server.client.set(CANCEL_KEY.format(task_id=task_id), 1)
        wait_for(stop.requested, 10, "the cancel to be seen")
        with pytest.raises(RenderCancelled):
            stop.check("decoding")  # also past the last step
