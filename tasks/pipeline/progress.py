"""Progress and timings of one render: task states a producer reads, and events Flower shows.

``StageClock`` moves the task through stages (``PROGRESS`` state with ``{"stage", "step",
"steps"}`` as its info, and ``resumed_from``, the step a render continued from after a checkpoint,
once it has) and records the seconds spent in each; ``timings()`` is what the
result reports. ``ProgressPublisher`` sends those updates from a background thread, so the
render never waits on Redis for them; ``store_progress`` never lets one replace a final state.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["INTERNALS", "MIN_STEP_INTERVAL_S", "PROGRESS", "ProgressPublisher", "StageClock", "store_progress"]

# The Redis result backend's members the progress write uses (checked by tests/test_internals.py).
INTERNALS = (
    "celery.backends.redis.RedisBackend.client",
    "celery.backends.redis.RedisBackend.get_key_for_task",
    "celery.backends.redis.RedisBackend.encode",
    "celery.backends.redis.RedisBackend.decode_result",
    "celery.backends.base.Backend.prepare_expires",  # what sets backend.expires (the results' TTL)
)

log = logging.getLogger("renderfarm.progress")
PROGRESS = "PROGRESS"
MIN_STEP_INTERVAL_S = 0.1


class StageClock:
    def __init__(self, task: Any) -> None:
        self._task = task
        # Celery's task.request is per thread: kept here, progress may come from an engine's thread.
        self._request = task.request
        self._started = time.perf_counter()
        self._stage_started = self._started
        self.stage: str | None = None
        self._timings: dict[str, float] = {}
        self._published = 0.0
        self._handed_over = False
        self.resumed_from: int | None = None  # this delivery continued from a checkpoint at this step

    def enter(self, stage: str, step: int | None = None, steps: int | None = None) -> None:
        """Close the current stage and start ``stage``; publish it as the task's PROGRESS."""
        now = time.perf_counter()
        if self.stage is not None:
            self._timings[self.stage] = self._timings.get(self.stage, 0.0) + (now - self._stage_started)
        self.stage, self._stage_started = stage, now
        self._publish(step, steps)

    def progress(self, stage: str, step: int | None, steps: int | None) -> None:
        """The engine's progress callback: a new stage, or the next step within the current one.

        Steps within a stage are handed to the publisher at most every ``MIN_STEP_INTERVAL_S``
        (the last one always); it sends the latest update at most that often.
        """
        if stage != self.stage:
            self.enter(stage, step, steps)
        elif step == steps or time.perf_counter() - self._published >= MIN_STEP_INTERVAL_S:
            self._publish(step, steps)

    def record(self, stage: str, seconds: float) -> None:
        """Add the seconds of work that ran alongside the current stage (the storage lookup)."""
        self._timings[stage] = self._timings.get(stage, 0.0) + seconds

    def timings(self) -> dict[str, float]:
        """Seconds per stage so far (the current stage included, and work ``record``-ed alongside) and ``total``."""
        now = time.perf_counter()
        out = dict(self._timings)
        if self.stage is not None:
            out[self.stage] = out.get(self.stage, 0.0) + (now - self._stage_started)
        out["total"] = now - self._started
        return {name: round(seconds, 4) for name, seconds in out.items()}

    def close(self) -> None:
        """Call before this render's final state is written: no PROGRESS may land after it.

        A pending update is dropped (the final state supersedes it, as a later update would have);
        one being sent is waited for. After ``hand_over()`` it does nothing.
        """
        if not self._handed_over and self._request.id is not None:
            PUBLISHER.settle(self._request.id)

    def hand_over(self) -> None:
        """The task returns, but its final state is written later by another thread (buffer mode's
        upload), which calls ``PUBLISHER.settle(task_id)`` first; the render's thread waits for nothing."""
        self._handed_over = True

    def _publish(self, step: int | None, steps: int | None) -> None:
        self._published = time.perf_counter()
        meta: dict[str, Any] = {"stage": self.stage}
        if steps is not None:
            meta.update(step=step, steps=steps)
        if self.resumed_from is not None:
            meta["resumed_from"] = self.resumed_from
        if self._request.id is None:
            return
        PUBLISHER.submit(self._task, self._request, meta)


class ProgressPublisher:
    """Writes ``PROGRESS`` states and sends ``task-progress`` events from one thread per process.

    Each update costs three Redis round trips (Celery reads the state before writing it, then the
    event) and Python work that competes with the render for the interpreter; made inline they
    paused the render about eight times per video. The render's thread now only hands over its
    latest update. This thread sends it, at most one update per ``min_interval_s`` per render
    (the latest wins; a render's first update goes out at once); what is superseded within that
    interval was never visible to anyone polling anyway. Before a task's final state (SUCCESS,
    FAILURE, REVOKED, RETRY) is written, ``settle()`` drops its pending update (the final state
    supersedes it the same way) and waits for one being sent, so a late ``PROGRESS`` never
    overwrites the final state and the task never waits for a write nobody would see.
    ``drain()`` instead sends the pending update and returns once it is out.
    """

    def __init__(
        self,
        min_interval_s: float = MIN_STEP_INTERVAL_S,
        drain_timeout_s: float = 30.0,
        store: Callable[[Any, str, dict[str, Any]], object] | None = None,
    ) -> None:
        """``store(backend, task_id, meta)`` writes one update (default: ``store_progress``)."""
        self._store = store or store_progress
        self._interval = min_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._cond = threading.Condition()
        self._pending: tuple[Any, Any, dict[str, Any]] | None = None
        self._sending: str | None = None  # the task whose update is being sent
        self._flush = False
        self._last: tuple[str | None, float] = (None, 0.0)  # (task id, when its last update was sent)

    def submit(self, task: Any, request: Any, meta: dict[str, Any]) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._start()
        with self._cond:
            self._pending = (task, request, meta)
            # Within the interval of this task's last send the thread is sending, or asleep until
            # the interval ends, when it takes the latest update: no wake-up needed. Waking it for
            # every step cost a tiny CPU render about 5 ms (GIL hand-overs), as much as sending.
            if request.id != self._last[0] or time.monotonic() >= self._interval_ends():
                self._cond.notify_all()

    def drain(self) -> None:
        """Send the last pending update now; block until nothing is pending or being sent."""
        if not self._started_here():
            return
        with self._cond:
            self._flush = True
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: self._pending is None and self._sending is None, self._drain_timeout_s)
            self._flush = False
        if not done:
            log.warning("progress updates still unsent after %.0fs (is Redis reachable?)", self._drain_timeout_s)

    def settle(self, task_id: str) -> None:
        """Drop the pending update of ``task_id``, if any; block while one of its updates is being sent."""
        if not self._started_here():
            return
        with self._cond:
            if self._pending is not None and self._pending[1].id == task_id:
                self._pending = None
            # No time limit: written after the final state, that update would replace it (Celery
            # protects only SUCCESS). A send ends, written or given up, within the result
            # backend's retry policy (a Redis outage is waited out: worker_config.celery_config).
            waited = 0.0
            while not self._cond.wait_for(lambda: self._sending != task_id, self._drain_timeout_s):
                waited += self._drain_timeout_s
                log.warning("the final state of %s waits for its progress update, unsent after %.0fs "
                            "(is Redis reachable?)", task_id, waited)  # fmt: skip

    def _started_here(self) -> bool:
        """Whether this process started the thread (after a fork the parent's is not ours)."""
        return self._thread is not None and self._pid == os.getpid()

    def _start(self) -> None:
        # Created here, in the process that publishes: after a fork the parent's are not ours.
        self._cond = threading.Condition()
        self._pending = None
        self._sending = None
        self._flush = False
        self._last = (None, 0.0)
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="progress-publisher", daemon=True)
        self._thread.start()

    def _wait_for_next(self) -> tuple[Any, Any, dict[str, Any]]:
        with self._cond:
            while True:
                wait = self._interval_ends() - time.monotonic()
                if self._pending is not None:
                    if self._flush or self._last[0] != self._pending[1].id or wait <= 0:
                        item, self._pending = self._pending, None
                        self._sending = item[1].id
                        return item
                    self._cond.wait(wait)
                else:  # asleep until the interval ends (see submit), then until woken
                    self._cond.wait(wait if wait > 0 else None)

    def _interval_ends(self) -> float:
        """When the interval after the last send ends (``time.monotonic()``); call holding ``_cond``."""
        return self._last[1] + self._interval

    def _run(self) -> None:
        while True:
            task, request, meta = self._wait_for_next()
            try:
                self._send(task, request, meta)
            finally:
                with self._cond:
                    self._sending, self._last = None, (request.id, time.monotonic())
                    self._cond.notify_all()

    def _send(self, task: Any, request: Any, meta: dict[str, Any]) -> None:
        try:
            self._store(task.backend, request.id, meta)
        except Exception as exc:  # noqa: BLE001 - progress must never fail a render
            log.warning("could not write the progress of %s: %s", request.id, exc)
        if task.app.conf.worker_send_task_events:
            # Monitors (Flower) only see events: a custom "task-progress" event puts the stage and
            # step on the task there too.
            try:
                with task.app.events.default_dispatcher(hostname=request.hostname) as dispatcher:
                    dispatcher.send("task-progress", uuid=request.id, retry=False, **meta)
            except Exception as exc:  # noqa: BLE001
                log.debug("could not send a task-progress event: %s", exc)


def store_progress(backend: Any, task_id: str, meta: dict[str, Any]) -> bool:
    """Write ``PROGRESS`` with ``meta`` as the task's state unless its state is final; False if it was.

    Celery's own write reads the state, then writes: not atomic. A worker paused (or cut off)
    between the two overwrote the ``SUCCESS`` another worker had written meanwhile with its stale
    ``PROGRESS`` (tests/test_leases.py caught it). Here the read and the write are one Redis
    transaction (WATCH): a final state written in between aborts this write. Published on the
    key's channel like Celery's writes, for producers waiting in ``.get(on_message=...)``.
    """
    import redis
    from celery import states

    key = backend.get_key_for_task(task_id)
    payload = backend.encode(
        {"status": PROGRESS, "result": meta, "traceback": None, "children": [], "date_done": None, "task_id": task_id}
    )
    with backend.client.pipeline() as pipe:
        try:
            pipe.watch(key)
            current = pipe.get(key)
            if current and backend.decode_result(current).get("status") in states.READY_STATES:
                return False
            pipe.multi()
            pipe.set(key, payload, ex=int(backend.expires) if backend.expires else None)
            pipe.publish(key, payload)
            pipe.execute()
        except redis.WatchError:  # the state changed between the read and the write: a final one won
            return False
    return True


PUBLISHER = ProgressPublisher()
