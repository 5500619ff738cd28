"""A Redis outage while a render runs (issue 14): Redis, with its append-only file, is killed
mid-render, kept down 20 s or 60 s and restarted on the same port.

The render goes on without Redis (its cancel checks and progress writes fail quietly and are
retried), its result write waits for Redis to come back, and a producer blocked in ``.get()``
across the whole outage gets the result: ``SUCCESS`` once, one object, the worker serving on.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery import Celery

from tests.support import PACED, RedisServer, videos_in, wait_for
from worker_config.celery_config import app_config
from worker_config.settings import BrokerSettings

# 200 steps paced to at least 0.15 s each: a render of 30 s or more, longer than the short outage
# (it finishes after Redis is back) and shorter than the long one (it finishes while Redis is down).
LONG = {"prompt": "through an outage", "height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 200}
PACED_SLOWER = {**PACED, "PACE_STEP_S": "0.15"}


def project_producer(url: str) -> Celery:
    """A producer configured as ``tasks.celery`` configures one (``app_config``)."""
    app = Celery("producer")
    app.conf.update(app_config(BrokerSettings(REDIS_URL=url)))
    return app


@pytest.mark.parametrize("down_s", [20, 60])
def test_a_render_in_flight_survives_a_redis_outage(down_s: int, start_worker, tmp_path, s3, bucket):
    redis = RedisServer(tmp_path, persistent=True)
    client = project_producer(redis.url)
    try:
        worker = start_worker(REDIS_URL=redis.url, **PACED_SLOWER)
        result = client.send_task("tasks.render", kwargs={**LONG, "seed": down_s}, queue="render")
        wait_for(lambda: result.state == "PROGRESS" and (result.info or {}).get("step", 0) >= 5, 120, "denoising")

        got: dict[str, Any] = {}
        waiting = threading.Thread(target=lambda: got.update(value=_get(result)), daemon=True)
        waiting.start()  # the producer blocks in .get() before the outage and across it

        redis.kill()
        down_since = time.monotonic()
        wait_for(lambda: time.monotonic() - down_since >= down_s, down_s + 5, f"{down_s} s of outage", interval=0.5)
        assert "value" not in got  # nothing could have been delivered while Redis was down
        redis.start()

        waiting.join(240)
        assert not waiting.is_alive(), "the producer's .get() did not return after Redis came back"
        done = got["value"]
        assert isinstance(done, dict), f"the producer got {done!r}"
        assert done["seed"] == down_s and done["cached"] is False
        assert result.state == "SUCCESS"
        assert worker.log.count(f"seed {down_s} ->") == 1  # rendered once, never started again
        succeeded = f"Task tasks.render[{result.id}] succeeded"  # logged by the main process after the write
        wait_for(lambda: succeeded in worker.log, 30, "the worker to log the success")
        assert worker.log.count(succeeded) == 1
        assert [o.object_name for o in videos_in(s3, bucket)] == [done["key"]]
        assert "could not check whether" in worker.log  # still denoising when Redis left: rendered on
        if down_s == 60:  # finished while Redis was down: its result waited for Redis
            assert done["timings"]["total"] < down_s

        after = client.send_task("tasks.render", kwargs={"prompt": "after the outage", "seed": 1}, queue="render")
        assert after.get(timeout=120)["worker"] == worker.hostname  # the same worker serves on, no restart
        assert worker.proc.poll() is None
    finally:
        client.close()
        redis.stop()


def _get(result: Any) -> Any:
    try:
        return result.get(timeout=300)
    except Exception as exc:  # noqa: BLE001 - reported by the assertions
        return exc


def test_reconnecting_a_producers_result_consumer_closes_what_it_drops(redis_server):
    """Celery's reconnect of ``.get()``'s pub/sub (after Redis went away) dropped the old pub/sub and
    the pool's idle connections without closing them; the project's backend closes them: reconnect
    as often as an outage would, and this process holds no more sockets to Redis than before."""
    import psutil

    client = project_producer(redis_server.url)
    try:
        result = client.AsyncResult("reconnect-probe")
        consumer = client.backend.result_consumer
        consumer.start(result.id)
        client.backend.client.get("warm-the-pool")  # an idle connection in the pool besides the pub/sub
        port = redis_server.port

        def to_redis() -> int:
            return sum(1 for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port)

        before = to_redis()
        for _ in range(5):
            consumer._reconnect_pubsub()
            client.backend.client.get("after-a-reconnect")
        assert to_redis() <= before
        assert consumer.subscribed_to == {client.backend.get_key_for_task(result.id)}
    finally:
        client.backend.result_consumer.stop()
        client.close()
