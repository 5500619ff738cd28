"""Cancelling, and saying what came of it (``tasks.cancel.cancel``, ``renderfarm cancel``), with real workers.

A running render stops at a denoising step, or at the boundary before decoding, encoding or
uploading (buffer mode: also in the background, before its upload starts); an upload under way is
not cut (``finished``). A queued one, in its queue or held by a worker, is reported ``queued`` and
discarded unrendered; an id nobody sent is ``unknown``; finished, failed and cancelled renders
say so. The model stays loaded throughout, nothing of a cancelled render is stored or spooled.

Two workers for the whole module, each on a Redis database of its own: one in queue mode, one in
buffer mode (with metrics). Renders are held at a stage boundary by ``tests/pacing.py`` (the prompt
says ``hold at <point>``) until their cancel has been seen, so each lands exactly there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery

from tasks.cancel import CANCEL_KEY, Outcome, cancel
from tests.support import (
    PACED,
    ROOT,
    S3Server,
    TestWorker,
    free_port,
    minio_client,
    videos_in,
    wait_for,
    worker_environment,
)
from tests.test_monitoring import scrape, value
from worker_config.celery_config import app_config
from worker_config.settings import BrokerSettings

SMALL = {"height": 64, "width": 64, "num_frames": 5, "num_inference_steps": 2}
# 60 steps paced to at least 0.1 s each (tests/pacing.py): still running when the test acts on it.
SLOW = {"height": 64, "width": 64, "num_frames": 5, "num_inference_steps": 60}


@dataclass
class Farm:
    worker: TestWorker
    app: Celery
    url: str
    env: dict[str, str]
    spool: Path
    bucket: str
    metrics_port: int

    def send(self, prompt: str, **request) -> object:
        return self.app.send_task("tasks.render", kwargs={"prompt": prompt, **request}, queue="render")

    def held(self, prompt: str, point: str, seed: int) -> object:
        """A small render held at ``point`` until its cancel is seen (the hold in place when this returns)."""
        result = self.send(f"{prompt}, hold at {point}", seed=seed, **SMALL)
        wait_for(lambda: f"holding {result.id} at {point}" in self.worker.log, 120, f"the render to reach {point}")
        return result

    def spooled(self) -> list[Path]:
        return [path for path in self.spool.rglob("*") if path.is_file()]


def _farm(mode: str, db: int, redis_server, s3_server: S3Server, model_cache: Path, root: Path) -> Farm:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{db}"  # a database of its own, emptied first
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    bucket = f"test-cancel-{mode}-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = worker_environment(
        url, s3_server.endpoint, bucket, model_cache, root, MINIO_PUBLIC_ENDPOINT=f"http://localhost:{s3_server.port}",
        WORKER_MODE=mode, METRICS_PORT=str(port), METRICS_ADDR="127.0.0.1", **PACED,
    )  # fmt: skip
    worker = TestWorker(f"cancel-{mode}", env, root / "worker.log", ("--without-mingle", "--without-gossip"))
    app = Celery("producer")
    app.conf.update(app_config(BrokerSettings(REDIS_URL=url)))
    try:
        worker.wait_ready()
    except BaseException:
        worker.stop()
        raise
    return Farm(worker, app, url, env, root / "spool", bucket, port)


@pytest.fixture(scope="module")
def queue_farm(redis_server, s3_server, model_cache, tmp_path_factory) -> Iterator[Farm]:
    farm = _farm("queue", 5, redis_server, s3_server, model_cache, tmp_path_factory.mktemp("queue-farm"))
    yield farm
    farm.app.close()
    farm.worker.stop()


@pytest.fixture(scope="module")
def buffer_farm(redis_server, s3_server, model_cache, tmp_path_factory) -> Iterator[Farm]:
    farm = _farm("buffer", 6, redis_server, s3_server, model_cache, tmp_path_factory.mktemp("buffer-farm"))
    yield farm
    farm.app.close()
    farm.worker.stop()


def cli_cancel(farm: Farm, task_id: str, *args: str) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "renderfarm.cli", "cancel", task_id, "--json", *args], cwd=ROOT,
                          env=farm.env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_a_running_render_stops_at_a_step_and_the_same_process_serves_on(queue_farm: Farm, s3_server):
    farm = queue_farm
    child = farm.worker.pool_children()[0].pid
    running = farm.send("a long render", seed=1, **SLOW)
    wait_for(lambda: running.state == "PROGRESS" and (running.info or {}).get("step", 0) >= 1, 120, "denoising")

    code, said = cli_cancel(farm, running.id)
    assert (code, said["outcome"], said["stage"], said["before"]) == (0, "stopped", "denoising", False), said
    assert 1 <= said["step"] < 60 and said["steps"] == 60
    assert running.state == "REVOKED" and type(running.info).__name__ == "TaskRevokedError"
    assert f"cancelled by request during stage 'denoising' at step {said['step']}/60" == str(running.info)
    assert f"stopped during denoising at step {said['step']}/60 (REVOKED)" in said["message"]

    after = farm.send("after the cancel", seed=2, **SMALL).get(timeout=120)
    assert after["worker_pid"] == child and farm.worker.log.count("engine loaded") == 1
    assert [o.object_name for o in videos_in(minio_client(s3_server), farm.bucket)] == [after["key"]]


@pytest.mark.parametrize(
    ("point", "stopped_before"), [("denoised", "decoding"), ("decoding", "encoding"), ("encoding", "uploading")]
)
def test_a_cancel_after_denoising_stops_the_render_at_the_next_stage_boundary(
    queue_farm: Farm, s3_server, point: str, stopped_before: str
):
    farm = queue_farm
    child = farm.worker.pool_children()[0].pid
    stored = {o.object_name for o in videos_in(minio_client(s3_server), farm.bucket)}
    render = farm.held("late", point, seed=10 + len(point))

    outcome = cancel(render.id, farm.app, wait_s=60)

    assert (outcome.outcome, outcome.stage, outcome.before) == (Outcome.STOPPED, stopped_before, True), outcome
    assert str(render.info) == f"cancelled by request before stage {stopped_before!r}"
    assert f"stopped before {stopped_before} (REVOKED)" in outcome.message()
    # Nothing of it stored or left in the spool; the same process, its model loaded once, serves on.
    assert {o.object_name for o in videos_in(minio_client(s3_server), farm.bucket)} == stored
    assert farm.spooled() == []
    assert farm.send("next", seed=3, **SMALL).get(timeout=120)["worker_pid"] == child
    assert farm.worker.log.count("engine loaded") == 1


def test_an_upload_under_way_is_not_cut_the_render_is_reported_finished(queue_farm: Farm, s3_server):
    farm = queue_farm
    render = farm.held("too late", "uploading", seed=20)  # queue mode: the upload follows in this thread

    outcome = cancel(render.id, farm.app, wait_s=60)

    assert outcome.outcome is Outcome.FINISHED and render.state == "SUCCESS", outcome
    assert outcome.key == render.result["key"] and outcome.key in outcome.message()
    assert render.result["key"] in {o.object_name for o in videos_in(minio_client(s3_server), farm.bucket)}
    assert not farm.app.backend.client.exists(CANCEL_KEY.format(task_id=render.id))  # nothing left to stop


def test_queued_unknown_running_and_already_final_renders_each_say_so(queue_farm: Farm):
    farm = queue_farm
    log_before = farm.worker.log.count(": render tiny-wan:")
    running = farm.send("a long render", seed=30, **SLOW)
    queued = farm.send("waits behind it", seed=31, **SMALL)
    wait_for(lambda: running.state == "PROGRESS" and (running.info or {}).get("step", 0) >= 1, 120, "denoising")

    code, said = cli_cancel(farm, queued.id)
    assert (code, said["outcome"], said["where"]) == (0, "queued", "render"), said
    assert "discarded when a worker receives it" in said["message"]

    still = cancel(running.id, farm.app, wait_s=0)  # asked, not waited for
    assert (still.outcome, still.stage) == (Outcome.RUNNING, "denoising"), still
    wait_for(lambda: running.state == "REVOKED", 60, "the running render to stop")
    assert queued.state == "REVOKED"  # written by Celery's revoke at once; the worker drops it on receipt:
    wait_for(lambda: f"Discarding revoked task: tasks.render[{queued.id}]" in farm.worker.log, 60, "the discard")
    assert farm.worker.log.count(": render tiny-wan:") == log_before + 1  # the queued one never started

    code, said = cli_cancel(farm, running.id)  # cancelled already: where it stopped
    assert (code, said["outcome"], said["stage"]) == (0, "revoked", "denoising"), said
    code, said = cli_cancel(farm, queued.id)  # discarded by Celery before it started
    assert (code, said["outcome"], said["stage"], said["error"]) == (0, "revoked", None, "revoked"), said

    nobody = str(uuid.uuid4())
    code, said = cli_cancel(farm, nobody)
    assert (code, said["outcome"], said["state"]) == (4, "unknown", "PENDING"), said
    assert "no render" in said["message"] and "is known" in said["message"]

    done = farm.send("finished", seed=32, **SMALL)
    key = done.get(timeout=120)["key"]
    code, said = cli_cancel(farm, done.id)
    assert (code, said["outcome"], said["key"]) == (3, "finished", key), said
    assert not farm.app.backend.client.exists(CANCEL_KEY.format(task_id=done.id))  # not even asked

    bad = farm.send("invalid", height=17)  # refused by the worker: FAILURE
    with pytest.raises(Exception, match="height"):
        bad.get(timeout=120)
    code, said = cli_cancel(farm, bad.id)
    assert (code, said["outcome"]) == (3, "failed") and said["error"].startswith("InvalidRequest: "), said


def test_buffer_mode_stops_a_render_whose_background_upload_has_not_started(buffer_farm: Farm, s3_server):
    farm = buffer_farm
    child = farm.worker.pool_children()[0].pid
    # Held on entering `uploading`, after the render's own last check: only the background thread can stop it.
    render = farm.held("background", "uploading", seed=40)

    outcome = cancel(render.id, farm.app, wait_s=60)

    assert (outcome.outcome, outcome.stage, outcome.before) == (Outcome.STOPPED, "uploading", True), outcome
    wait_for(lambda: "cancelled before its background upload started" in farm.worker.log, 30, "the upload thread")
    assert list(videos_in(minio_client(s3_server), farm.bucket)) == [] and farm.spooled() == []
    after = farm.send("after", seed=41, **SMALL).get(timeout=120)
    assert after["worker_pid"] == child and farm.worker.log.count("engine loaded") == 1
    assert value(scrape(farm.metrics_port), "renderfarm_renders_total", outcome="cancelled") == 1  # counted once


def test_buffer_mode_a_render_held_by_the_worker_is_queued_and_discarded(buffer_farm: Farm):
    farm = buffer_farm
    cancelled = value(scrape(farm.metrics_port), "renderfarm_renders_total", outcome="cancelled")
    log_before = farm.worker.log.count(": render tiny-wan:")
    running = farm.send("a long render", seed=50, **SLOW)
    prefetched = farm.send("prefetched", seed=51, **SMALL)  # buffer mode holds one more message
    waiting = farm.send("in the queue", seed=52, **SMALL)
    wait_for(lambda: running.state == "PROGRESS" and (running.info or {}).get("step", 0) >= 1, 120, "denoising")
    wait_for(lambda: farm.app.backend.client.hlen("unacked") == 2, 30, "the worker to prefetch the next render")

    held = cancel(prefetched.id, farm.app)
    assert (held.outcome, held.where) == (Outcome.QUEUED, "worker"), held
    assert "held by a worker that has not started it" in held.message()
    assert (cancel(waiting.id, farm.app).outcome, cancel(running.id, farm.app).outcome) == (
        Outcome.QUEUED, Outcome.STOPPED,
    )  # fmt: skip
    for result in (prefetched, waiting):
        assert result.state == "REVOKED"  # Celery's revoke writes it at once; the worker drops each on receipt
        discarded = f"Discarding revoked task: tasks.render[{result.id}]"
        wait_for(lambda discarded=discarded: discarded in farm.worker.log, 60, "a queued render to be discarded")
    assert farm.worker.log.count(": render tiny-wan:") == log_before + 1
    samples = scrape(farm.metrics_port)
    assert value(samples, "renderfarm_renders_total", outcome="cancelled") == cancelled + 3
