"""Checkpointed denoising with real workers on tiny-wan: a killed or stopped worker costs at most a
checkpoint interval (SIGKILL) or nothing (SIGTERM), the resumed video is the same bytes, and a
checkpoint that is wrong, damaged, unreadable or cannot be saved never fails a render.

The workers of this module share one Redis database, one bucket and one S3 endpoint, which they
reach through ``CheckpointGate``: an HTTP proxy in front of moto that passes everything, or
refuses the checkpoints' reads or writes (storage failing exactly there). One steady worker
continues the render another worker gave back (SIGTERM) or died in (SIGKILL), and serves the
bad-checkpoint tests; both interrupted renders are the same request, rendered once more from
noise for the reference. All use the same short lease (a worker's sweep hands out the tasks whose
lease is older than its own visibility timeout: every worker on one Redis must agree). Renders are paced
(``tests.pacing``: at least 0.1 s a step, each step printed) so they last long enough to act on.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from celery import Celery

from tests.support import (
    PACED,
    RedisServer,
    S3Server,
    TestWorker,
    free_port,
    minio_client,
    wait_for,
    worker_environment,
)
from tests.test_monitoring import scrape, value

EVERY_S = 0.5  # checkpoints every 0.5 s: at most 5 steps paced to 0.1 s each
INTERVAL_STEPS = 5
STEPS = 30
REQUEST = {"prompt": "a checkpointed render", "height": 64, "width": 64, "num_frames": 9, "num_inference_steps": STEPS,
           "seed": 21}  # fmt: skip
SHORT_LEASE = {"VISIBILITY_TIMEOUT_S": "6", "LEASE_RENEW_S": "2"}
SAVED = re.compile(r"checkpoint of \S+ at step (\d+) of \d+ saved")


class CheckpointGate:
    """An HTTP proxy in front of the S3 endpoint; ``refuse`` = "GET" or "PUT" answers 503 to that
    method on every object under checkpoints/ (the storage failing for them), None passes all."""

    def __init__(self, upstream_port: int) -> None:
        self.refuse: str | None = None
        self.refused: list[str] = []
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == gate.refuse and "/checkpoints/" in self.path:
                    gate.refused.append(f"{self.command} {self.path}")
                    self._answer(503, {"Content-Type": "application/xml"}, b"<Error><Code>SlowDown</Code></Error>")
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                    response = upstream.getresponse()
                    data = response.read()
                    headers = {k: v for k, v in response.getheaders() if k.lower() not in ("transfer-encoding",
                                                                                          "connection")}  # fmt: skip
                    self._answer(response.status, headers, data)
                finally:
                    upstream.close()

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value_ in headers.items():
                    if name.lower() != "content-length":
                        self.send_header(name, value_)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Farm:
    """The module's workers: one environment, each started with its own overrides."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.workers = env, logs, []

    def start(self, name: str, **overrides: str) -> TestWorker:
        worker = TestWorker(name, {**self.env, **overrides}, self.logs / f"{name}.log",
                            ("--without-mingle", "--without-gossip"))  # fmt: skip
        self.workers.append(worker)
        return worker.wait_ready()  # type: ignore[return-value]

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture(scope="module")
def bucket() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def gate(s3_server: S3Server) -> Iterator[CheckpointGate]:
    gate = CheckpointGate(s3_server.port)
    yield gate
    gate.close()


@pytest.fixture(scope="module")
def farm(
    redis_server: RedisServer, s3_server: S3Server, gate: CheckpointGate, model_cache: Path, bucket: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Farm]:  # fmt: skip
    redis_server.client.flushall()
    work = tmp_path_factory.mktemp("checkpoints")
    env = worker_environment(
        redis_server.url, gate.endpoint, bucket, model_cache, work, MINIO_PUBLIC_ENDPOINT=s3_server.endpoint,
        CHECKPOINT_EVERY_S=str(EVERY_S), **PACED,
    )  # fmt: skip
    farm = Farm(env, work)
    yield farm
    farm.stop()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def steady(farm: Farm, metrics_port: int) -> TestWorker:
    """The worker that continues the killed render and serves the bad-checkpoint renders."""
    return farm.start("steady", METRICS_PORT=str(metrics_port), **SHORT_LEASE)


@pytest.fixture
def s3(s3_server: S3Server):
    return minio_client(s3_server)


def consuming(producer: Celery, worker: TestWorker, on: bool) -> None:
    """Start or stop ``worker`` taking tasks from ``render`` (Celery's remote control)."""
    command = producer.control.add_consumer if on else producer.control.cancel_consumer
    replies = command("render", destination=[worker.hostname], reply=True, timeout=10)
    assert replies, f"{worker.hostname} did not answer"


def new_lines(worker: TestWorker, since: int) -> str:
    return worker.log[since:]


def last_int(pattern: str, text: str) -> int | None:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else None


def checkpoint_objects(s3, bucket: str) -> list[str]:
    return [o.object_name for o in s3.list_objects(bucket, prefix="checkpoints/", recursive=True)]


_REFERENCE: dict[str, str] = {}


def reference_sha256(producer: Celery, request: dict, worker: TestWorker) -> str:
    """The same request rendered from noise, uninterrupted, by ``worker`` (``force``: not served from
    storage); rendered once per module."""
    key = repr(sorted(request.items()))
    if key not in _REFERENCE:
        since = len(worker.log)
        again = producer.send_task("tasks.render", kwargs={**request, "force": True}, queue="render").get(timeout=120)
        assert "from noise" in new_lines(worker, since) and "resuming" not in new_lines(worker, since)
        _REFERENCE[key] = str(again["sha256"])
    return _REFERENCE[key]


def queued_task_ids(redis_server: RedisServer) -> list[str]:
    """The ids of the tasks waiting in the ``render`` queue (kombu's Redis list, at priority 0)."""
    return [json.loads(raw)["headers"]["id"] for raw in redis_server.client.lrange("render", 0, -1)]


def follow(result, until: Callable[[], bool]) -> list[dict]:
    """The task's PROGRESS infos seen until ``until()``."""
    seen: list[dict] = []

    def look() -> bool:
        if result.state == "PROGRESS" and isinstance(result.info, dict) and result.info not in seen[-1:]:
            seen.append(dict(result.info))
        return until()

    wait_for(look, 120, "the render to go on", interval=0.02)
    return seen


def test_sigterm_hands_the_render_back_and_another_worker_continues_where_it_stopped(
    farm: Farm, steady: TestWorker, producer: Celery, s3, bucket: str, redis_server: RedisServer
):
    consuming(producer, steady, False)  # the leaving worker takes the render
    # No periodic checkpoint in its renders (every 30 s): the steady worker resumes from the one it
    # saves where it stops.
    leaving = farm.start("leaving", CHECKPOINT_EVERY_S="30", **SHORT_LEASE)
    result = producer.send_task("tasks.render", kwargs=REQUEST, queue="render")
    wait_for(lambda: f"denoising step 5 of {STEPS}" in leaving.log, 120, "the render to be well under way")

    leaving.proc.send_signal(signal.SIGTERM)  # what Kubernetes, docker stop and a spot notice send
    try:
        code = leaving.proc.wait(30)  # the grace period every platform gives at least (docs/deploy.md)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within 30 s of SIGTERM:\n{leaving.log[-3000:]}")
    assert code == 0
    # Given back at once: queued again (not waiting in the unacked set for its lease to lapse), and
    # not counted as a delivery its worker died in (MAX_DELIVERIES).
    assert queued_task_ids(redis_server) == [result.id]
    assert not redis_server.client.exists(f"renderfarm:deliveries:{result.id}:0")
    stopped = re.search(rf"denoising handed back: \d+ steps computed in this delivery \(steps 1 to (\d+) of {STEPS}",
                        leaving.log)  # fmt: skip
    assert stopped is not None, leaving.log[-3000:]
    stopped_at = int(stopped.group(1))
    assert 5 <= stopped_at < STEPS and "the task goes back to the queue" in leaving.log

    since = len(steady.log)
    consuming(producer, steady, True)
    done = result.get(timeout=120)
    log = new_lines(steady, since)
    assert done["worker"] == steady.hostname
    assert f"resuming {done['key']} from the checkpoint at step {stopped_at} of {STEPS}" in log
    computed_second = last_int(r"denoising completed: (\d+) steps computed in this delivery", log)
    assert computed_second == STEPS - stopped_at  # no step computed twice
    assert checkpoint_objects(s3, bucket) == []
    assert done["sha256"] == reference_sha256(producer, REQUEST, steady)  # the same video, bit for bit


def test_a_worker_killed_mid_denoising_costs_at_most_one_checkpoint_interval(
    farm: Farm, steady: TestWorker, producer: Celery, s3, bucket: str, metrics_port: int
):
    before = scrape(metrics_port)
    consuming(producer, steady, False)  # the doomed worker takes the render
    doomed = farm.start("doomed", **SHORT_LEASE)
    # The same request as the SIGTERM test's (force: its video is stored already): one reference render.
    result = producer.send_task("tasks.render", kwargs={**REQUEST, "force": True}, queue="render")
    wait_for(lambda: SAVED.search(doomed.log), 120, "a first checkpoint")
    saved_then = last_int(SAVED.pattern, doomed.log)
    assert saved_then is not None
    wait_for(lambda: f"denoising step {saved_then + 2} of {STEPS}" in doomed.log, 60, "two steps past the checkpoint")
    os.killpg(doomed.proc.pid, signal.SIGKILL)  # the whole worker: main process, pool, everything
    doomed.proc.wait(30)
    computed_first = last_int(rf"denoising step (\d+) of {STEPS}", doomed.log)
    logged = last_int(SAVED.pattern, doomed.log)  # a save can complete and its line not be written
    assert computed_first is not None and logged is not None and saved_then <= logged <= computed_first

    since = len(steady.log)
    consuming(producer, steady, True)  # its lease lapses (VISIBILITY_TIMEOUT_S=6): the steady worker gets it
    infos = follow(result, result.ready)
    done = result.get(timeout=10)
    log = new_lines(steady, since)
    assert done["worker"] == steady.hostname
    resumed = last_int(rf"resuming {done['key']} from the checkpoint at step (\d+) of {STEPS}", log)
    assert resumed is not None and logged <= resumed <= computed_first
    # Progress says it resumed, and from where (the killed delivery's last updates carry no resumed_from).
    assert {info["resumed_from"] for info in infos if "resumed_from" in info} == {resumed}
    assert any(info.get("resumed_from") == resumed and info["step"] > computed_first for info in infos)
    computed_second = last_int(r"denoising completed: (\d+) steps computed in this delivery", log)
    assert computed_second == STEPS - resumed
    # What the kill cost: the steps since the last checkpoint. At most one interval's (0.5 s of steps
    # paced to 0.1 s), and one more if the kill came while the next checkpoint was being uploaded.
    assert computed_first + computed_second <= STEPS + INTERVAL_STEPS + 1
    assert checkpoint_objects(s3, bucket) == []  # deleted once the video was stored

    after = scrape(metrics_port)

    def counted(name: str) -> float:
        return value(after, name) - value(before, name)

    assert counted("renderfarm_render_resumes_total") == 1
    assert counted("renderfarm_denoising_steps_saved_total") == resumed
    assert counted("renderfarm_denoising_steps_total") == computed_second
    rule = {r.rule_id: r for r in s3.get_bucket_lifecycle(bucket).rules}["renderfarm-checkpoints"]
    assert (rule.rule_filter.prefix, rule.expiration.days) == ("checkpoints/", 1)

    assert done["sha256"] == reference_sha256(producer, REQUEST, steady)  # the same video, bit for bit


def planted(kind: str, request: dict, bucket: str, s3) -> str:
    """A checkpoint of ``kind`` ("mismatch": the same render by another engine; "damaged": one
    byte of its payload changed) put where ``request``'s render looks; its key."""
    import io

    import torch

    from tasks.engines import DenoisingState
    from tasks.keys import object_key, resolve
    from tasks.pipeline.checkpoints import Identity, checkpoint_key, encode
    from tasks.schemas import Limits, RenderRequest

    spec = resolve(RenderRequest(**request), "tiny-wan", "any", Limits(max_prompt_chars=2000, max_pixel_frames=10**9,
                                                                       models=("tiny-wan",)))  # fmt: skip
    engine = "fastvideo" if kind == "mismatch" else "diffusers"
    identity = Identity(object_key(spec), "tiny-wan", "built-in v1", engine, spec)
    state = DenoisingState(step=3, steps=spec["num_inference_steps"], tensors={"latents": torch.zeros(1, 16, 3, 8, 8)},
                           values={"kind": "scheduler-v1"})  # fmt: skip
    data = bytearray(encode(identity, state))
    if kind == "damaged":
        data[-100] ^= 0xFF
    key = checkpoint_key(object_key(spec))
    s3.put_object(bucket, key, io.BytesIO(bytes(data)), len(data))
    return key


@pytest.mark.parametrize("kind", ["mismatch", "damaged", "unreadable"])
def test_a_checkpoint_that_does_not_match_is_damaged_or_unreadable_is_ignored_and_the_render_starts_over(
    kind: str, steady: TestWorker, gate: CheckpointGate, producer: Celery, s3, bucket: str, metrics_port: int
):
    request = {"prompt": f"a {kind} checkpoint", "height": 32, "width": 32, "num_frames": 5,
               "num_inference_steps": 8, "seed": 30}  # fmt: skip
    # Unreadable: there is one, made right, but storage fails every read of it.
    key = planted("damaged" if kind == "unreadable" else kind, request, bucket, s3)
    gate.refuse = "GET" if kind == "unreadable" else None
    since = len(steady.log)
    try:
        done = producer.send_task("tasks.render", kwargs=request, queue="render").get(timeout=120)
    finally:
        gate.refuse = None
    log = new_lines(steady, since)
    assert done["cached"] is False
    assert f"checkpoint {key} ignored ({kind}: " in log and "the render starts over" in log
    assert "8 steps computed in this delivery (steps 1 to 8 of 8, from noise)" in log
    assert key not in checkpoint_objects(s3, bucket)  # replaced by the render's own, deleted with it
    assert value(scrape(metrics_port), "renderfarm_checkpoints_ignored_total", reason=kind) == 1  # once per kind


def test_storage_failing_while_checkpoints_are_saved_costs_those_checkpoints_not_the_render(
    steady: TestWorker, gate: CheckpointGate, producer: Celery, s3, bucket: str, metrics_port: int
):
    request = {**REQUEST, "num_inference_steps": 10, "seed": 31}  # paced: 1 s or more, a save due at 0.5 s
    before = value(scrape(metrics_port), "renderfarm_checkpoints_total", outcome="failed")
    gate.refuse = "PUT"
    since = len(steady.log)
    try:
        done = producer.send_task("tasks.render", kwargs=request, queue="render").get(timeout=120)
    finally:
        gate.refuse = None
    log = new_lines(steady, since)
    assert done["cached"] is False and done["worker"] == steady.hostname
    failed = value(scrape(metrics_port), "renderfarm_checkpoints_total", outcome="failed") - before
    assert failed >= 1 and log.count("not saved (the render goes on)") == failed
    assert any("PUT" in refused and "/checkpoints/" in refused for refused in gate.refused)
    assert checkpoint_objects(s3, bucket) == []
