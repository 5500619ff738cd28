"""Checkpointed denoising through FastVideo's own worker process, in real workers (run in .venv-fastvideo).

The denoising loop runs in FastVideo's mp worker; its state reaches the pool process as a file
beside the render's output when the pool process asks for it over the step channel, and goes back
the same way for a resume (tasks/engines/fastvideo_state.py). A pool process killed mid-render
costs at most a checkpoint interval; a worker stopped with SIGTERM gives the render back where it
stopped and another FastVideo worker continues it; both give the same MP4 bytes as a render that
was never interrupted. The workers share one Redis, one bucket (the helpers of
tests/test_checkpoints.py) and one short lease. Renders are small (64x64, 9 frames) and nothing
paces FastVideo's worker (it does not wait for the pool process between steps): a step takes
5 ms on an idle 2-core machine and half a second on a loaded one, so a render has 100 of them
and a checkpoint is due every 0.05 s, and the tests act on what the logs say, never on time.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.support import PACED, RedisServer, S3Server, TestWorker, minio_client, wait_for, worker_environment
from tests.test_checkpoints import SAVED, Farm, checkpoint_objects, consuming, last_int, new_lines, queued_task_ids

try:
    import fastvideo  # noqa: F401
except ImportError:
    pytest.skip("fastvideo is not installed in this venv: see tests/test_fastvideo.py", allow_module_level=True)

pytestmark = pytest.mark.timeout(600)

STEPS = 100
REQUEST = {"prompt": "a checkpointed fastvideo render", "height": 64, "width": 64, "num_frames": 9,
           "num_inference_steps": STEPS, "seed": 41}  # fmt: skip
EVERY_S = 0.05
SHORT_LEASE = {"VISIBILITY_TIMEOUT_S": "6", "LEASE_RENEW_S": "2"}
# Each step printed (tests.pacing), none slowed: FastVideo's worker does not wait for the pool
# process's reports, which a pace would only delay.
UNPACED = {**PACED, "PACE_STEP_S": "0"}
_REFERENCE: dict[str, str] = {}


@pytest.fixture(scope="module")
def bucket() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def farm(
    redis_server: RedisServer, s3_server: S3Server, model_cache: Path, bucket: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Farm]:  # fmt: skip
    redis_server.client.flushall()
    work = tmp_path_factory.mktemp("fastvideo-checkpoints")
    env = worker_environment(
        redis_server.url, s3_server.endpoint, bucket, model_cache, work, ENGINE="fastvideo",
        DISTRIBUTED_EXECUTOR_BACKEND="mp", CHECKPOINT_EVERY_S=str(EVERY_S), **SHORT_LEASE, **UNPACED,
    )  # fmt: skip
    farm = Farm(env, work)
    yield farm
    farm.stop()


@pytest.fixture(scope="module")
def first(farm: Farm) -> TestWorker:
    return farm.start("first")


@pytest.fixture
def s3(s3_server: S3Server):
    return minio_client(s3_server)


def reference_sha256(producer: Celery, worker: TestWorker) -> str:
    """REQUEST rendered from noise without interruption by ``worker``, once per module."""
    if "sha256" not in _REFERENCE:
        since = len(worker.log)
        done = producer.send_task("tasks.render", kwargs={**REQUEST, "force": True}, queue="render").get(timeout=300)
        assert "from noise" in new_lines(worker, since) and "resuming" not in new_lines(worker, since)
        _REFERENCE["sha256"] = str(done["sha256"])
    return _REFERENCE["sha256"]


def test_a_pool_process_killed_mid_denoising_resumes_from_its_fastvideo_checkpoint(
    first: TestWorker, producer: Celery, s3, bucket: str
):
    [child] = first.pool_children()
    result = producer.send_task("tasks.render", kwargs=REQUEST, queue="render")
    wait_for(lambda: SAVED.search(first.log), 180, "a first checkpoint from FastVideo's worker")
    saved_then = last_int(SAVED.pattern, first.log)
    assert saved_then is not None
    since = len(first.log)
    os.kill(child.pid, signal.SIGKILL)  # FastVideo's worker goes with it (PR_SET_PDEATHSIG)
    done = result.get(timeout=300)  # redelivered at once (WorkerLostError), to the replacement child

    before = first.log[:since]
    computed_first = last_int(rf"denoising step (\d+) of {STEPS}", before)
    logged = last_int(SAVED.pattern, before)
    log = new_lines(first, since)
    resumed = last_int(rf"resuming {done['key']} from the checkpoint at step (\d+) of {STEPS}", log)
    assert computed_first is not None and logged is not None and resumed is not None
    assert logged <= resumed  # (FastVideo's worker may be ahead of the steps it reported when it was killed)
    assert "continuing from the state after step" in log  # said by FastVideo's worker itself
    computed_second = last_int(r"denoising completed: (\d+) steps computed in this delivery", log)
    assert computed_second == STEPS - resumed
    # What the kill cost: at most one checkpoint interval's steps (as this machine runs them: the steps
    # between two checkpoints, or before the first), and one for a save under way when it was killed.
    saves = [int(step) for step in re.findall(SAVED.pattern, before)]
    interval = max([saves[0], *(b - a for a, b in itertools.pairwise(saves))])
    assert computed_first + computed_second <= STEPS + interval + 1
    assert done["worker_pid"] != child.pid and done["engine"] == "fastvideo"
    assert checkpoint_objects(s3, bucket) == []
    assert done["sha256"] == reference_sha256(producer, first)  # the same video, bit for bit


def test_sigterm_hands_a_fastvideo_render_back_and_another_worker_continues_it(
    farm: Farm, first: TestWorker, producer: Celery, s3, bucket: str, redis_server: RedisServer
):
    second = farm.start("second")
    consuming(producer, second, False)
    since = len(first.log)
    result = producer.send_task("tasks.render", kwargs={**REQUEST, "force": True}, queue="render")
    wait_for(lambda: f"denoising step 5 of {STEPS}" in new_lines(first, since), 180, "the render to be under way")

    first.proc.send_signal(signal.SIGTERM)
    try:
        code = first.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within 30 s of SIGTERM:\n{first.log[-3000:]}")
    assert code == 0
    assert queued_task_ids(redis_server) == [result.id]  # back in the queue at once
    stopped = re.findall(rf"denoising handed back: \d+ steps computed in this delivery \(steps 1 to (\d+) of {STEPS}",
                         first.log)  # fmt: skip
    assert stopped, first.log[-3000:]
    stopped_at = int(stopped[-1])

    since = len(second.log)
    consuming(producer, second, True)
    done = result.get(timeout=300)
    log = new_lines(second, since)
    resumed = last_int(rf"resuming {done['key']} from the checkpoint at step (\d+) of {STEPS}", log)
    # FastVideo's worker writes the state at the step boundary where it stops (an older one only if a
    # periodic save was under way when the shutdown came): at most one step computed twice.
    assert resumed is not None and 0 <= stopped_at - resumed <= 1, (stopped_at, resumed)
    assert last_int(r"denoising completed: (\d+) steps computed in this delivery", log) == STEPS - resumed
    assert done["worker"] == second.hostname and checkpoint_objects(s3, bucket) == []
    assert done["sha256"] == reference_sha256(producer, second)


def test_a_render_given_back_by_a_ray_executor_worker_continues_on_an_mp_one(
    farm: Farm, producer: Celery, s3, bucket: str, redis_server: RedisServer
):
    """FastVideo's Ray executor: the state is taken in its Ray actor, and the same state serves
    FastVideo's mp executor (the same loop, the same engine): the continued video is the same bytes."""
    [second] = [w for w in farm.workers if w.name == "second" and w.proc.poll() is None]
    consuming(producer, second, False)
    ray = farm.start("ray", DISTRIBUTED_EXECUTOR_BACKEND="ray")
    result = producer.send_task("tasks.render", kwargs={**REQUEST, "force": True}, queue="render")
    wait_for(lambda: f"denoising step 5 of {STEPS}" in ray.log, 180, "the render to be under way")
    ray.proc.send_signal(signal.SIGTERM)
    try:
        assert ray.proc.wait(30) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"the Ray worker did not exit within 30 s of SIGTERM:\n{ray.log[-3000:]}")
    assert queued_task_ids(redis_server) == [result.id]
    stopped_at = last_int(rf"denoising handed back: \d+ steps computed in this delivery \(steps 1 to (\d+) of {STEPS}",
                          ray.log)  # fmt: skip
    assert stopped_at is not None, ray.log[-3000:]

    since = len(second.log)
    consuming(producer, second, True)
    done = result.get(timeout=300)
    log = new_lines(second, since)
    resumed = last_int(rf"resuming {done['key']} from the checkpoint at step (\d+) of {STEPS}", log)
    assert resumed is not None and 0 <= stopped_at - resumed <= 1, (stopped_at, resumed)
    assert done["worker"] == second.hostname and checkpoint_objects(s3, bucket) == []
    assert done["sha256"] == reference_sha256(producer, second)
