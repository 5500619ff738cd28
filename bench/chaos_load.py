"""The chaos soak's producer: a steady stream of renders of mixed lengths, and what became of each.

A new request goes out whenever fewer than ``outstanding`` are waiting or running (the stream keeps
the farm busy without an ever longer queue, and slows down while the farm is down). Each request
is a distinct render (its own prompt and seed: its own object key), 64x64, 9 frames, with 8, 20, 40
or 80 denoising steps (paced to at least 0.1 s each: about 1 to 8 s of denoising), sent under a
task id of the producer's own. A publish that raises (Redis down) is tried again under the same
task id until Redis takes it. The final state of every request is read straight from the result
backend's keys (``celery-task-meta-<id>``), never through the farm's code.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Load", "Request", "FINAL", "STEPS", "read_states"]

STEPS = (8, 20, 40, 80)
FINAL = ("SUCCESS", "FAILURE", "REVOKED")
_META = "celery-task-meta-"


@dataclass
class Request:
    id: str
    kwargs: dict[str, Any]
    created: float
    accepted: float | None = None  # when Redis took the message
    publish_errors: int = 0
    state: str | None = None  # the last state read from the result backend
    final: float | None = None  # when a final state was first seen
    result: Any = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_states(client: Any, ids: list[str]) -> dict[str, dict[str, Any]]:
    """``{id: meta}`` for the ids whose result key exists (the stored state and result)."""
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for task_id, raw in zip(chunk, client.mget([_META + i for i in chunk]), strict=True):
            if raw is not None:
                found[task_id] = json.loads(raw)
    return found


class Load:
    """The producer thread: ``start()``, ``stop_sending()``, ``wait_final(until)``, ``requests``."""

    def __init__(self, redis_url: str, label: str, seed: int, outstanding: int) -> None:
        import redis
        from celery import Celery

        from worker_config.celery_config import app_config
        from worker_config.settings import BrokerSettings

        self.app = Celery("chaos-producer")
        self.app.conf.update(app_config(BrokerSettings(REDIS_URL=redis_url)))
        self.client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.label, self.outstanding = label, outstanding
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(seed * 7919 + 17)
        self._sending = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-producer", daemon=True)

    def start(self) -> None:
        self._sending.set()
        self._thread.start()

    def stop_sending(self) -> None:
        self._sending.clear()

    def pending(self) -> list[Request]:
        return [r for r in self.requests.values() if r.final is None]

    def wait_final(self, until: float) -> None:
        """Until every request has a final state, or the wall clock passes ``until``."""
        while self.pending() and time.time() < until:
            time.sleep(0.5)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.app.close()
        self.client.close()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - Redis down: read again next round
                pass
            waiting = self.pending()
            for request in [r for r in waiting if r.accepted is None]:
                self._publish(request)
            if self._sending.is_set() and len(waiting) < self.outstanding:
                self._publish(self._next())

    def _next(self) -> Request:
        number = len(self.requests) + 1
        kwargs = {"prompt": f"chaos soak {self.label}: request {number}", "seed": number, "height": 64, "width": 64,
                  "num_frames": 9, "num_inference_steps": self._rng.choice(STEPS)}  # fmt: skip
        request = Request(f"chaos-{self.label}-{number:05d}", kwargs, time.time())
        self.requests[request.id] = request
        return request

    def _publish(self, request: Request) -> None:
        try:
            self.app.send_task("tasks.render", kwargs=request.kwargs, task_id=request.id, queue="render",
                               retry=True, retry_policy={"max_retries": 1, "interval_start": 0.2})  # fmt: skip
        except Exception:  # noqa: BLE001 - Redis down: published again, same task id, next round
            request.publish_errors += 1
            return
        request.accepted = time.time()

    def _poll(self) -> None:
        ids = [r.id for r in self.pending() if r.accepted is not None]
        for task_id, meta in read_states(self.client, ids).items():
            request = self.requests[task_id]
            request.state = meta.get("status")
            if request.state in FINAL:
                request.final, request.result = time.time(), meta.get("result")
