"""Many models, one farm (issue 17, part 1): each request goes to the workers that hold its model.

Two real workers on one Redis serve two models: ``tiny-wan`` (the farm's ``DEFAULT_MODEL``, on
the ``render`` queue) and the same checkpoint loaded from its directory (another model id, so its
own queue ``render.<slug>``). A producer configured like this project's (its router) names only
the model; a bare producer names the documented queue. A request for a model whose worker is not
running waits in that model's queue (``renderfarm models`` shows it) and renders once one starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery

from tasks.engines.tiny_wan import ensure_tiny_wan
from tests.support import ROOT, free_port, videos_in
from tests.test_monitoring import scrape, value
from worker_config.celery_config import app_config
from worker_config.routing import queue_for
from worker_config.settings import BrokerSettings

SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "renderfarm.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_two_models_on_one_redis_each_get_only_their_own_requests(
    start_worker, worker_env, model_cache: Path, redis_server, s3, bucket
):
    other = str(ensure_tiny_wan(model_cache))  # the same weights under another model id: a second model
    other_queue = queue_for(other, "tiny-wan")
    assert other_queue.startswith("render.") and other_queue != "render"
    farm = {"DEFAULT_MODEL": "tiny-wan", "ENGINE": "diffusers"}
    env = {**worker_env, **farm}
    producer = Celery("producer")  # routes by model, as render.delay does: no queue named below
    producer.conf.update(app_config(BrokerSettings(REDIS_URL=redis_server.url, DEFAULT_MODEL="tiny-wan")))
    bare = Celery("bare", broker=redis_server.url, backend=redis_server.url)
    unaware = Celery("unaware")  # configured like this project's producers, without DEFAULT_MODEL
    unaware.conf.update(app_config(BrokerSettings(REDIS_URL=redis_server.url)))
    try:
        # The second model's worker is not up yet: its request waits in its own queue.
        early = producer.send_task("tasks.render", kwargs={"prompt": "early", "model": other, "seed": 1, **SMALL})
        metrics = free_port()
        default = start_worker(**farm, METRICS_PORT=str(metrics), METRICS_ADDR="127.0.0.1")
        listed = json.loads(cli(env, "models", "--json").stdout)
        assert {(r["model"], tuple(r["queues"]), r["workers"], r["waiting"]) for r in listed} == {
            ("tiny-wan", ("render", "render.tiny-wan"), 1, 0), (None, (other_queue,), 0, 1)
        }, listed  # fmt: skip
        assert early.state == "PENDING"  # the tiny-wan worker never took it

        second = start_worker(**farm, MODEL_ID=other, DEVICE="cpu")
        assert early.get(timeout=120)["worker"] == second.hostname

        # Which queue each kind of producer picks is test_each_kind_of_producer_reaches_the_queue_docs_name
        # (in-process); here each worker renders what reaches its queues, and only that.
        sent = [
            (default, producer.send_task("tasks.render", kwargs={"prompt": "default", "seed": 2})),
            (default, producer.send_task("tasks.render", kwargs={"prompt": "named", "model": "tiny-wan", "seed": 2})),
            (
                second,
                producer.send_task("tasks.render", kwargs={"prompt": "other", "model": other, "seed": 2, **SMALL}),
            ),
            # A producer that does not know the farm's DEFAULT_MODEL and names the default model.
            (default, unaware.send_task("tasks.render", kwargs={"prompt": "unaware", "model": "tiny-wan"})),
        ]
        # A producer that does not import the project names the documented queue.
        sent.append((second, bare.send_task("tasks.render", kwargs={"prompt": "bare", "model": other, **SMALL},
                                            queue=other_queue)))  # fmt: skip
        for worker, result in sent:
            done = result.get(timeout=120)
            assert done["worker"] == worker.hostname, (done["model"], done["worker"])
            assert done["model"] == ("tiny-wan" if worker is default else other)
        assert f"render {other}:" not in default.log and "render tiny-wan:" not in second.log
        assert len(videos_in(s3, bucket)) == len(sent) + 1

        workers = {w["worker"]: w for w in json.loads(cli(env, "workers", "--json").stdout)}
        assert workers[default.hostname]["queues"] == ["render", "render.tiny-wan"]
        assert workers[second.hostname]["queues"] == [other_queue]
        listed = json.loads(cli(env, "models", "--json").stdout)
        assert {(r["model"], r["default"], tuple(r["queues"]), r["workers"]) for r in listed} == {
            ("tiny-wan", True, ("render", "render.tiny-wan"), 1), (other, False, (other_queue,), 1)
        }, listed  # fmt: skip
        table = cli(env, "models")  # on stdout, where `renderfarm workers` prints its own
        assert table.returncode == 0 and "tiny-wan (default)" in table.stdout and other_queue[:12] in table.stdout
        assert "tiny-wan (default)" not in table.stderr, table.stderr
        samples = scrape(metrics)  # the model is a label of every render series
        assert value(samples, "renderfarm_renders_total", model="tiny-wan", outcome="success") == 3
        assert value(samples, "renderfarm_renders_total", model=other) == 0
    finally:
        producer.close()
        bare.close()
        unaware.close()


OTHER = "acme/Wan-Other"  # a model id: routing needs no weights


@pytest.fixture(scope="module")
def celery_worker_parameters() -> dict:
    """The in-process worker consumes what a tiny-wan worker of a farm without DEFAULT_MODEL does, and OTHER's queue."""
    return {"perform_ping_check": False, "queues": ["render", "render.tiny-wan", queue_for(OTHER, "tiny-wan")]}


def test_each_kind_of_producer_reaches_the_queue_docs_name(in_process_worker, redis_server):
    """docs/api.md's routing, as each kind of producer sends: a Celery worker in this process (pytest-celery's
    ``celery_worker``, real Redis) answers with the queue each request came from; no model is needed for that."""

    def came_from(self, **_: object) -> str:
        return str(self.request.delivery_info["routing_key"])

    in_process_worker({"tasks.render": came_from})
    farm = Celery("farm")  # configured like this project's producers (render.delay): its router, DEFAULT_MODEL
    farm.conf.update(app_config(BrokerSettings(REDIS_URL=redis_server.url, DEFAULT_MODEL="tiny-wan")))
    unaware = Celery("unaware")  # the same without DEFAULT_MODEL
    unaware.conf.update(app_config(BrokerSettings(REDIS_URL=redis_server.url)))
    bare = Celery("bare", broker=redis_server.url, backend=redis_server.url)  # does not import the project
    other_queue = queue_for(OTHER, "tiny-wan")
    try:
        cases = [
            (farm, {"prompt": "x"}, {}, "render"),
            (farm, {"prompt": "x", "model": "tiny-wan"}, {}, "render"),
            (farm, {"prompt": "x", "model": OTHER}, {}, other_queue),
            (farm, {"prompt": "x", "model": "..."}, {}, "render"),  # no queue name in it: the worker refuses it there
            (unaware, {"prompt": "x"}, {}, "render"),
            (unaware, {"prompt": "x", "model": "tiny-wan"}, {}, "render.tiny-wan"),  # still reaches tiny-wan's workers
            (bare, {"prompt": "x", "model": OTHER}, {"queue": other_queue}, other_queue),
            (bare, {"prompt": "x"}, {"queue": "render"}, "render"),
        ]
        sent = [(app.send_task("tasks.render", kwargs=kwargs, **options), want) for app, kwargs, options, want in cases]
        assert [result.get(timeout=60) for result, _ in sent] == [want for _, want in sent]
        assert other_queue == "render.acme-wan-other"
    finally:
        for app in (farm, unaware, bare):
            app.close()
