"""The documented setups, together (issue 25, part 6; DESIGN.md rule 12): one farm started the way
the docs describe it, all at once on one Redis and one bucket, and every documented way in.

Each component is started by the command its doc gives, with the settings the docs give, adapted
only for loopback ports, the test's Redis and S3 endpoint and the tiny models: ``tiny-wan`` is the
farm's ``DEFAULT_MODEL``, ``tiny-wan-ti2v`` the second model (it takes images), and the tiny-wan
checkpoint loaded from its directory a third model, which no worker serves at first. Every
component reads one environment, as compose's services read one ``.env``; a port given on a doc's
command line is a free loopback port here.

component           started as                                       from (doc, section)
------------------  -----------------------------------------------  ------------------------------------------
settings, shared    REDIS_URL, MINIO_*, SPOOL_DIR, HEALTH_DIR,       README "For operators"; .env.example;
                    METRICS_PORT (9100)                              docs/settings.md
                    DEFAULT_MODEL=tiny-wan                           docs/api.md "Two models on one host":
                                                                     `export DEFAULT_MODEL=tiny-wan`
                    WEBHOOK_QUEUE=webhooks                           docs/monitoring.md "A separate webhook
                                                                     worker": "on every worker"
                    WEBHOOK_SECRET, WEBHOOK_ALLOWED_HOSTS            README (webhook snippet); docs/settings.md
default model       MODEL_ID=tiny-wan renderfarm worker              docs/api.md "Two models on one host", 2nd line
                    + WORKER_MODE=buffer                             docs/deploy.md "More hosts" (`docker run`)
                    + tests.pacing (PACED), for the cancels          tests/support.py
second model        MODEL_ID=tiny-wan-ti2v METRICS_PORT=9101         docs/api.md "Two models on one host", 3rd line
                    renderfarm worker
webhook worker      METRICS_PORT=9102 celery -A tasks worker         docs/monitoring.md "A separate webhook
                    -Q webhooks --pool=threads --concurrency=8       worker" (the command block)
                    -n webhooks@%h
probes              python -m tasks.worker.healthcheck --name NAME   docs/deploy.md "Several GPUs on one host"
                    [--probe startup|live]                           (the probes take renderfarm worker's names)
Flower              renderfarm flower (FLOWER_BASIC_AUTH)            docs/monitoring.md "Flower"; README
API key             renderfarm api-key alice >> api-keys             README `renderfarm api` line; docs/api.md "Keys"
videos API          renderfarm api (API_KEYS_FILE, DEFAULT_MODEL)    README `renderfarm api` line; docs/api.md
third model         MODEL_ID=<dir> renderfarm worker, started late   docs/api.md "A model no worker serves";
                    (ENGINE=diffusers DEVICE=cpu: a local directory) docs/settings.md MODEL_ID, ENGINE, DEVICE

request             sent by                                          from
------------------  -----------------------------------------------  ------------------------------------------
default model       render.delay(...) in a producer importing tasks  README "For producers", 1st snippet
image-conditioned   render.delay(model="tiny-wan-ti2v",              README, image snippet
                    image=data_url("cat.png"))
with a webhook      render.delay(webhook_url=...)                    README, webhook snippet; docs/api.md "Webhooks"
third model         render.delay(model=<dir>) before its worker;     docs/api.md "A model no worker serves"
                    `renderfarm models --json` lists it waiting
default, bare       Celery(broker, backend).send_task(               README, 2nd snippet
                    "tasks.render", queue="render", priority=3)
through Flower      POST /api/task/async-apply/tasks.render,         docs/monitoring.md "Flower"
                    GET /api/task/result/ID
through the API     client.videos.create_and_poll(...),              docs/api.md "HTTP API (OpenAI-compatible)"
                    download_content(...) (openai SDK)
cancel, mid-way     renderfarm cancel ID --json                      README; docs/api.md "Cancelling"
revoke in Flower    POST /api/task/revoke/ID (the Revoke button)     README ("it can send, follow and cancel
                                                                     renders"); docs/monitoring.md "Flower"
cancel, late        cancel(id, wait_s=...) while the render is held  docs/api.md "Cancelling" (the snippet)
                    after its last step (tests/pacing.py)

The producer that imports this project runs in a Python of its own: ``tasks`` reads ``REDIS_URL``
and ``DEFAULT_MODEL`` from its environment when it is imported (README), and this test process
imported it before the farm existed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from celery import Celery

from tasks.cancel import Outcome, cancel
from tasks.engines.tiny_wan import ensure_tiny_wan
from tasks.keys import object_key
from tasks.profiles import profile_for
from tests.gateway import Gateway
from tests.support import (
    PACED,
    ROOT,
    TestWorker,
    download_verified,
    ffprobe,
    free_port,
    videos_in,
    wait_for,
    watch_events,
)
from tests.test_flower import Flower, running_flower
from tests.test_image_renders import picture
from tests.test_monitoring import scrape, value
from tests.test_webhooks import (
    RENDER_WORKER,
    SECRET,
    WEBHOOK_WORKER,
    Receiver,
    answers,
    check_signature,
    consumed,
    documented_worker,
)
from worker_config.celery_config import app_config
from worker_config.routing import queue_for
from worker_config.settings import BrokerSettings

T = TypeVar("T")
R = TypeVar("R")
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")  # the SDK's own

SMALL = {"height": 64, "width": 64, "num_frames": 5, "num_inference_steps": 1}
LONG = {"height": 64, "width": 64, "num_frames": 5, "num_inference_steps": 200}  # paced: 20 s unless cancelled
SPEC_FIELDS = ("prompt", "negative_prompt", "num_frames", "height", "width", "num_inference_steps", "guidance_scale",
               "seed", "fps", "model")  # fmt: skip

# README's producer snippets as a producer runs them (sizes made tiny); it waits for each result.
PRODUCER = """
import json, sys
from tasks import render
from tasks.images import data_url

image_file, hook_url, third_model = sys.argv[1:]
small = dict(height=64, width=64, num_frames=5, num_inference_steps=1)
sent = {
    "delay": render.delay(prompt="a lighthouse in a storm, cinematic", seed=7, **small),
    "image": render.delay(prompt="the cat wakes up", model="tiny-wan-ti2v", image=data_url(image_file), seed=8,
                          **small),
    "webhook": render.delay(prompt="a red fox", webhook_url=hook_url, seed=9, **small),
    "unserved": render.delay(prompt="a model scaled from zero", model=third_model, seed=10, **small),
}
print(json.dumps({name: r.id for name, r in sent.items()}), flush=True)
print(json.dumps({name: r.get(timeout=240)["key"] for name, r in sent.items()}), flush=True)
"""
PRODUCED = {  # what PRODUCER sends, by name
    "delay": {"prompt": "a lighthouse in a storm, cinematic", "seed": 7, **SMALL},
    "image": {"prompt": "the cat wakes up", "seed": 8, **SMALL},
    "webhook": {"prompt": "a red fox", "seed": 9, **SMALL},
    "unserved": {"prompt": "a model scaled from zero", "seed": 10, **SMALL},
}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "renderfarm.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def side_by_side(function: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``function`` on each item, in threads side by side (processes started or stopped at once)."""
    with ThreadPoolExecutor() as pool:
        return list(pool.map(function, items))


def content_key(request: dict, result: dict) -> str:
    """The key docs/api.md gives a video: the hash of its resolved request (the model's defaults filled in)."""
    spec = {**profile_for(result["model"]).defaults(), **request, "seed": result["seed"], "model": result["model"]}
    resolved = {name: spec[name] for name in SPEC_FIELDS}
    if result["image_sha256"]:
        resolved["image_sha256"] = result["image_sha256"]
    return object_key(resolved)


@dataclass
class Farm:
    env: dict[str, str]  # the one environment every component reads
    app: Celery  # what the test follows results and events with: configured like the project's producers
    workers: dict[str, TestWorker]
    metrics: dict[str, int]  # each worker's METRICS_PORT
    flower: Flower
    gateway: Gateway
    hook: Receiver
    third_model: str
    folder: Path

    def start_third_worker(self) -> TestWorker:
        name = "render-" + queue_for(self.third_model, None).removeprefix("render.")  # renderfarm worker's default
        env = {**self.env, "MODEL_ID": self.third_model, "ENGINE": "diffusers", "DEVICE": "cpu",
               "METRICS_PORT": str(self.metrics["third"])}  # fmt: skip
        self.workers["third"] = documented_worker(self.folder, env, name, RENDER_WORKER)
        return self.workers["third"]


def start_api(env: dict[str, str], folder: Path) -> Gateway:
    """`renderfarm api-key alice >> api-keys` (the key read from the terminal's stream), then `renderfarm api`."""
    keys = folder / "api-keys"
    made = subprocess.run(f"{sys.executable} -m renderfarm.cli api-key alice >> {keys}", shell=True, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    key = re.search(r"\b(rf-\S+)", made.stderr)
    assert made.returncode == 0 and key, made.stderr
    port = free_port()
    log = folder / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "renderfarm.cli", "api", "--port", str(port)], cwd=ROOT,
                                env={**env, "API_KEYS_FILE": str(keys)}, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    gateway = Gateway(proc, port, {"alice": key[1]}, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"renderfarm api exited with {proc.returncode}:\n{gateway.log_text()[-3000:]}")
        try:
            return gateway.raw("GET", "/videos")[0] == 200  # the key works
        except OSError:
            return False

    wait_for(up, 60, "the API to answer")
    return gateway


@pytest.fixture
def farm(worker_env: dict[str, str], model_cache: Path, tmp_path: Path) -> Iterator[Farm]:
    """Everything of the table above but the third model's worker, started at once, each as its doc says."""
    metrics = {name: free_port() for name in ("default", "ti2v", "webhooks", "third")}
    env = {k: v for k, v in worker_env.items() if k != "MODEL_ID"}  # each worker's command line sets its own
    env.update(DEFAULT_MODEL="tiny-wan", WEBHOOK_QUEUE="webhooks", WEBHOOK_SECRET=SECRET,
               WEBHOOK_ALLOWED_HOSTS="127.0.0.1:*",  # the receiver listens on a random port
               METRICS_PORT=str(metrics["default"]))  # fmt: skip
    app = Celery("farm")
    app.conf.update(app_config(BrokerSettings(REDIS_URL=env["REDIS_URL"], DEFAULT_MODEL="tiny-wan")))
    with contextlib.ExitStack() as stack:
        stack.callback(app.close)
        hook = Receiver()
        stack.callback(hook.close)
        workers = {
            "default": documented_worker(tmp_path, {**env, "MODEL_ID": "tiny-wan", "WORKER_MODE": "buffer", **PACED},
                                         "render-tiny-wan", RENDER_WORKER),
            "ti2v": documented_worker(tmp_path, {**env, "MODEL_ID": "tiny-wan-ti2v",
                                                 "METRICS_PORT": str(metrics["ti2v"])},
                                      "render-tiny-wan-ti2v", RENDER_WORKER),
            "webhooks": documented_worker(tmp_path, {**env, "METRICS_PORT": str(metrics["webhooks"])}, "webhooks",
                                          WEBHOOK_WORKER),
        }  # fmt: skip
        stack.callback(side_by_side, TestWorker.stop, workers.values())
        flower = stack.enter_context(running_flower(env, tmp_path))
        gateway = start_api(env, tmp_path)
        stack.callback(gateway.stop)
        workers["default"].wait_ready()
        workers["ti2v"].wait_ready()
        wait_for(lambda: answers(app, workers["webhooks"]), 60, "the webhook worker to answer")
        yield Farm(env, app, workers, metrics, flower, gateway, hook, str(ensure_tiny_wan(model_cache)), tmp_path)


def test_the_documented_farm_serves_every_documented_request_once(farm: Farm, s3, bucket, tmp_path: Path):
    app, flower, workers, env = farm.app, farm.flower, farm.workers, farm.env
    default, ti2v, notifier = workers["default"], workers["ti2v"], workers["webhooks"]
    # Each worker consumes what docs/monitoring.md and docs/api.md say.
    assert consumed(app, default) == ["render", "render.tiny-wan", "webhooks"]
    assert consumed(app, ti2v) == ["render.tiny-wan-ti2v", "webhooks"]
    assert consumed(app, notifier) == ["webhooks"]
    # docs/deploy.md's probes, each render worker's by the name renderfarm worker gave it (one host, one HEALTH_DIR).
    probes = side_by_side(
        lambda argv: subprocess.run([sys.executable, "-m", "tasks.worker.healthcheck", *argv], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=60),
        [["--name", worker.name, *probe] for worker in (default, ti2v)
         for probe in ([], ["--probe", "startup"], ["--probe", "live"])],
    )  # fmt: skip
    assert [done.returncode for done in probes] == [0] * 6, [done.stdout + done.stderr for done in probes]

    events: list[dict] = []
    with watch_events(app, {"task-received": events.append}):
        # README's producer, in a Python of its own: four renders, one for a model no worker serves yet.
        (tmp_path / "cat.png").write_bytes(picture(1, size=(96, 64)))
        producer_env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "REDIS_", "MODEL_"))}
        readme = subprocess.Popen(
            [sys.executable, "-c", PRODUCER, str(tmp_path / "cat.png"), farm.hook.url, farm.third_model], cwd=ROOT,
            env={**producer_env, "REDIS_URL": env["REDIS_URL"], "DEFAULT_MODEL": "tiny-wan"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert readme.stdout is not None
            ids = json.loads(readme.stdout.readline() or "null") or pytest.fail(readme.communicate()[1])
            requests = {ids[name]: request for name, request in PRODUCED.items()}
            model_of = {ids["image"]: "tiny-wan-ti2v", ids["unserved"]: farm.third_model}  # else tiny-wan

            # README's bare send_task, with the normal priority; Flower's API, as docs/monitoring.md shows it.
            bare = Celery(broker=env["REDIS_URL"], backend=env["REDIS_URL"])
            try:
                sent = bare.send_task("tasks.render", kwargs={"prompt": "a red fox", "seed": 11, **SMALL},
                                      queue="render", priority=3)  # fmt: skip
                requests[sent.id] = {"prompt": "a red fox", "seed": 11, **SMALL}
                via_flower = flower.json("/api/task/async-apply/tasks.render",
                                         {"kwargs": {"prompt": "sent by Flower", "seed": 12, **SMALL}})  # fmt: skip
                requests[via_flower["task-id"]] = {"prompt": "sent by Flower", "seed": 12, **SMALL}

                # The third model's request waits in its own queue, listed by renderfarm models; its worker starts.
                listed = json.loads(cli(env, "models", "--json").stdout)
                third_queue = queue_for(farm.third_model, "tiny-wan")
                assert [(r["queues"], r["workers"], r["waiting"]) for r in listed if r["model"] is None] == [
                    ([third_queue], 0, 1)
                ], listed
                assert app.AsyncResult(ids["unserved"]).state == "PENDING"
                third = farm.start_third_worker()  # it loads while the rest goes on

                # The openai SDK, as docs/api.md shows it.
                client = farm.gateway.client()
                video = client.videos.create_and_poll(prompt="a fox in the snow", model="tiny-wan", size="64x64",
                                                      seconds="1", poll_interval_ms=200)  # fmt: skip
                assert (video.status, video.progress, video.error) == ("completed", 100, None), video
                client.videos.download_content(video.id).write_to_file(tmp_path / "fox.mp4")
                probe = ffprobe(tmp_path / "fox.mp4")
                assert (probe["width"], probe["height"], int(probe["nb_read_frames"])) == (64, 64, 9)
                requests[video.id] = {"prompt": "a fox in the snow", "height": 64, "width": 64, "num_frames": 9}

                # Three to cancel, one after the other: mid-way with `renderfarm cancel`, mid-way with Flower's
                # Revoke, and held after its last denoising step (tests/pacing.py) with cancel().
                mid = bare.send_task("tasks.render", kwargs={"prompt": "cancelled mid-way", "seed": 13, **LONG},
                                     queue="render", priority=3)  # fmt: skip
                revoke = {"kwargs": {"prompt": "revoked", "seed": 14, **LONG}}
                revoked = app.AsyncResult(flower.json("/api/task/async-apply/tasks.render", revoke)["task-id"])
                held = {"prompt": "cancelled late, hold at denoised", "seed": 15, **SMALL}
                late = bare.send_task("tasks.render", kwargs=held, queue="render", priority=3)
            finally:
                bare.close()
            cancelled = [mid.id, revoked.id, late.id]

            wait_for(lambda: mid.state == "PROGRESS" and (mid.info or {}).get("step", 0) >= 1, 120, "denoising")
            done = cli(env, "cancel", mid.id, "--json")
            said = json.loads(done.stdout or "null") or pytest.fail(done.stderr)
            assert (done.returncode, said["outcome"], said["stage"], said["before"]) == (0, "stopped", "denoising",
                                                                                         False), said  # fmt: skip
            assert str(mid.info) == f"cancelled by request during stage 'denoising' at step {said['step']}/200"

            wait_for(lambda: revoked.state == "PROGRESS" and (revoked.info or {}).get("step", 0) >= 1, 120,
                     "denoising")  # fmt: skip
            assert flower.request(f"/api/task/revoke/{revoked.id}?terminate=false", {})[0] == 200
            wait_for(lambda: revoked.state == "REVOKED", 60, "the render revoked in Flower to stop")
            assert re.fullmatch(r"cancelled by request during stage 'denoising' at step \d+/200", str(revoked.info))

            wait_for(lambda: f"holding {late.id} at denoised" in default.log, 120, "the render to finish denoising")
            outcome = cancel(late.id, app, wait_s=60)
            assert (outcome.outcome, outcome.stage, outcome.before) == (Outcome.STOPPED, "decoding", True), outcome
            assert str(late.info) == "cancelled by request before stage 'decoding'"

            # The README producer's .get() returned each of its results: the third model's rendered once its
            # worker started.
            stdout, stderr = readme.communicate(timeout=240)
            assert readme.returncode == 0, stderr
        finally:
            if readme.poll() is None:
                readme.kill()
                readme.communicate()
        keys = json.loads(stdout)
        results = {task_id: app.AsyncResult(task_id).get(timeout=120) for task_id in requests}
        wait_for(lambda: farm.hook.deliveries, 60, "the webhook")
        wait_for(lambda: {e.get("uuid") for e in events} >= {*requests, *cancelled}, 30, "every task-received event")
        # Flower shows the cancels as the workers' events say them, and the result of what it sent.
        shown = lambda: [flower.json(f"/api/task/info/{task_id}").get("state") for task_id in cancelled]  # noqa: E731
        wait_for(lambda: shown() == ["REVOKED"] * 3, 30, "REVOKED in Flower")
        from_flower = flower.json(f"/api/task/result/{via_flower['task-id']}")

    # Every request ended as documented: SUCCESS, a playable MP4 under its content-addressed key; or REVOKED.
    assert keys == {name: results[ids[name]]["key"] for name in PRODUCED}
    assert from_flower["state"] == "SUCCESS" and from_flower["result"]["key"] == results[via_flower["task-id"]]["key"]
    serves = {default.hostname: "tiny-wan", ti2v.hostname: "tiny-wan-ti2v", third.hostname: farm.third_model}
    for task_id, result in results.items():
        assert result["model"] == model_of.get(task_id, "tiny-wan") == serves[result["worker"]], result
        assert result["key"] == content_key(requests[task_id], result) and not result["cached"], result
        probe = download_verified(result, tmp_path / f"{task_id}.mp4")
        assert (probe["width"], probe["height"], int(probe["nb_read_frames"])) == (64, 64, result["num_frames"])
    image = results[ids["image"]]
    assert image["image_key"] == f"inputs/{image['image_sha256']}.png"
    assert [app.AsyncResult(task_id).state for task_id in cancelled] == ["REVOKED"] * 3
    assert default.log.count("engine loaded") == 1  # no cancel cost the model
    # The bucket holds exactly these videos (nothing of the cancelled ones), and the one image.
    assert sorted(o.object_name for o in videos_in(s3, bucket)) == sorted(r["key"] for r in results.values())
    assert [o.object_name for o in s3.list_objects(bucket, prefix="inputs/")] == [image["image_key"]]

    # The webhook: delivered once, signed, with the render's result.
    assert len(farm.hook.deliveries) == 1
    payload = check_signature(*farm.hook.deliveries[0])
    assert (payload["event"], payload["task_id"]) == ("render.succeeded", ids["webhook"])
    assert payload["result"]["key"] == results[ids["webhook"]]["key"]

    # Each render received by exactly one worker, one serving its model; the webhook worker took no render.
    received: dict[str, list[str]] = {}
    for event in events:
        if event.get("name") == "tasks.render":
            received.setdefault(event["uuid"], []).append(event["hostname"])
    assert received == {
        **{task_id: [result["worker"]] for task_id, result in results.items()},
        **{task_id: [default.hostname] for task_id in cancelled},
    }, received
    assert [e["name"] for e in events if e.get("uuid") not in received] == ["tasks.deliver_webhook"]
    assert consumed(app, notifier) == ["webhooks"] and consumed(app, third) == [third_queue, "webhooks"]
    listed = {w["worker"]: (w["model"], w["answers"]) for w in json.loads(cli(env, "workers", "--json").stdout)}
    assert listed == {default.hostname: ("tiny-wan", 1), ti2v.hostname: ("tiny-wan-ti2v", 1),
                      third.hostname: (farm.third_model, 1), notifier.hostname: (None, 1)}  # fmt: skip
    # ... and started once: one render line per task in all the workers' logs, none served from storage.
    logs = "".join(worker.log for worker in workers.values())
    for task_id in [*results, *cancelled]:
        assert len(re.findall(rf"\[{task_id}\] tasks\.render: render ", logs)) == 1, task_id
    assert "served from storage" not in logs and "tasks.render" not in notifier.log
    # The buffer-mode worker uploaded each of its videos in the background.
    for result in results.values():
        if result["worker"] == default.hostname:
            assert re.search(rf"uploaded {result['key']} in \S+ \(background\)", default.log), result["key"]

    # Each worker's metrics: the videos it denoised, its cancels, no render given back, the one delivery.
    counts = {name: scrape(port) for name, port in farm.metrics.items()}
    made = {name: [r["worker"] for r in results.values()].count(workers[name].hostname) for name in counts}
    assert made == {"default": 5, "ti2v": 1, "webhooks": 0, "third": 1}
    for name, videos in made.items():
        assert value(counts[name], "renderfarm_renders_total", outcome="success") == videos, name
        assert value(counts[name], "renderfarm_render_stage_seconds_count", stage="denoising") == videos, name
    assert value(counts["default"], "renderfarm_renders_total", outcome="cancelled") == 3
    assert sum(value(c, "renderfarm_renders_requeued_total") for c in counts.values()) == 0
    assert sum(value(c, "renderfarm_webhook_deliveries_total", outcome="delivered") for c in counts.values()) == 1
