"""Redis Sentinel (issue 16): the farm keeps rendering when the Redis master's host is lost.

Real processes on loopback (renderfarm/localsentinel.py): a master and a replica, both with a
password, and three sentinels with their own password. ``REDIS_URL`` lists the sentinels,
``REDIS_SENTINEL_MASTER`` names the master. A stream of renders is queued, the master is killed
(SIGKILL) while the first one renders, the sentinels promote the replica, and every request
completes with one object each. Replication is asynchronous, so the newest writes can die with the
master; a request whose result does not come is sent again with the same task id (what
docs/reliability.md#sentinel tells producers to do) and is served from storage or rendered once.

Then, on the new master, each component that talks to Redis: the project's producer
(``render.delay`` through ``renderfarm submit --wait``), ``renderfarm status``, ``doctor`` and
``workers``, the health probe, the worker's lease keeper and queue-depth metric, and Flower.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout

from renderfarm.localsentinel import SentinelCluster
from tests.support import PACED, ROOT, free_port, videos_in, wait_for, wait_for_denoising
from tests.test_flower import running_flower
from tests.test_monitoring import scrape, value
from worker_config.celery_config import app_config
from worker_config.settings import BrokerSettings

STREAM = 6


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    server = SentinelCluster(tmp_path / "redis", password="master-secret", sentinel_password="sentinel-secret")
    yield server
    server.stop()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "renderfarm.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)  # fmt: skip


def test_renders_go_on_through_a_failover_and_every_component_follows_the_master(
    cluster: SentinelCluster, start_worker, worker_env, s3, bucket, tmp_path: Path
):
    metrics = free_port()
    worker = start_worker(**cluster.env, METRICS_PORT=str(metrics), METRICS_ADDR="127.0.0.1",
                          VISIBILITY_TIMEOUT_S="6", LEASE_RENEW_S="1", **PACED)  # fmt: skip
    pool_pid = worker.pool_children()[0].pid
    # A producer that knows only the transport options (app_config), not the project's tasks.
    producer = Celery("producer")
    producer.conf.update(app_config(BrokerSettings(**cluster.env)))
    requests = [{"prompt": f"through a failover {i}", "seed": i, "num_inference_steps": 30} for i in range(STREAM)]
    try:
        sent = [producer.send_task("tasks.render", kwargs=request, queue="render") for request in requests]
        wait_for_denoising(sent[0])
        old = cluster.kill_master()
        new = cluster.wait_for_failover(old)
        assert new != old

        results, resent = {}, 0
        for request, result in zip(requests, sent, strict=True):
            try:
                results[result.id] = result.get(timeout=120)
            except ResultTimeout:  # lost with the old master's newest writes: the same task id again
                resent += 1
                again = producer.send_task("tasks.render", kwargs=request, queue="render", task_id=result.id)
                results[result.id] = again.get(timeout=120)
        print(f"failover {old} -> {new}: {resent} of {STREAM} requests sent again")
        assert [results[r.id]["seed"] for r in sent] == list(range(STREAM))
        assert all(producer.AsyncResult(r.id).state == "SUCCESS" for r in sent)
        keys = sorted(results[r.id]["key"] for r in sent)
        assert len(set(keys)) == STREAM and sorted(o.object_name for o in videos_in(s3, bucket)) == keys
        assert worker.pool_children()[0].pid == pool_pid  # the same process served through it all
    finally:
        producer.close()

    env = {**worker_env, **cluster.env}
    # The project's producer (render.delay), on the new master.
    submitted = cli(env, "submit", "after the failover", "--seed", "40", "--steps", "60")
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    waited = cli(env, "result", task_id, "--timeout", "150")
    assert waited.returncode == 0 and '"seed": 40' in waited.stdout, waited.stderr
    status = cli(env, "status", task_id)
    assert status.returncode == 0 and '"state": "SUCCESS"' in status.stdout, status.stderr
    doctor = cli(env, "doctor", "--producer")
    assert f"master farm at 127.0.0.1:{new} (from the sentinels)" in doctor.stderr, doctor.stderr
    workers = cli(env, "workers", "--json")
    assert workers.returncode == 0 and worker.hostname in workers.stdout, workers.stderr
    probe = subprocess.run([sys.executable, "-m", "tasks.worker.healthcheck", "--name", worker.name, "--timeout", "10"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    wait_for(
        lambda: value(scrape(metrics), "renderfarm_broker_up") == 1, 30, "the queue-depth metric on the new master"
    )

    # The lease keeper renews on the new master: a running render's score in the unacked index moves.
    master = cluster.servers[new].client
    leased = cli(env, "submit", "leased on the new master", "--seed", "41", "--steps", "80")
    assert leased.returncode == 0, leased.stderr
    first = wait_for(lambda: master.zrange("unacked_index", 0, -1, withscores=True), 60, "a lease on the new master")
    time.sleep(2.5)
    later = master.zrange("unacked_index", 0, -1, withscores=True)
    assert later and later[0][0] == first[0][0] and later[0][1] > first[0][1], (first, later)

    # Flower, through the sentinels: the worker, the queue's length, a render's result.
    with running_flower(env, tmp_path) as flower:
        wait_for(lambda: worker.hostname in flower.json("/api/workers?refresh=1"), 60, "Flower to list the worker")
        queues = flower.json("/api/queues/length")
        assert [q["name"] for q in queues["active_queues"]] == ["render", "render.tiny-wan"], queues
        assert flower.json(f"/api/task/result/{task_id}")["state"] == "SUCCESS"


def test_a_sentinel_url_without_a_master_name_is_refused_with_the_fix(worker_env, cluster: SentinelCluster):
    env = {**worker_env, "REDIS_URL": cluster.url}
    done = cli(env, "doctor", "--producer")
    assert done.returncode == 2, done.stderr
    assert "set REDIS_SENTINEL_MASTER" in done.stderr and "master-secret" not in done.stderr + done.stdout
    wrong = cli({**env, **cluster.env, "REDIS_SENTINEL_PASSWORD": "not-it"}, "doctor", "--producer")
    assert wrong.returncode != 0 and "REDIS_SENTINEL_PASSWORD is missing or wrong" in wrong.stderr, wrong.stderr
