"""Progress and timings of one render: task states a producer reads, and events Flower shows.

``StageClock`` moves the task through stages (``PROGRESS`` state with ``{"stage", "step",
"steps"}`` as its info) and records the seconds spent in each; ``timings()`` is what the
result reports. ``ProgressPublisher`` sends those updates from a background thread, so the
render never waits on Redis for them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

__all__ = ["MIN_STEP_INTERVAL_S", "PROGRESS", "ProgressPublisher", "StageClock"]

log = logging.getLogger("renderfarm.progress")
PROGRESS = "PROGRESS"
MIN_STEP_INTERVAL_S = 0.1


class StageClock:
    def __init__(self, task: Any) -> None:
        self._task = task
        self._started = time.perf_counter()
        self._stage_started = self._started
        self.stage: str | None = None
        self._timings: dict[str, float] = {}
        self._published = 0.0

    def enter(self, stage: str, step: int | None = None, steps: int | None = None) -> None:
        """Close the current stage and start ``stage``; publish it as the task's PROGRESS."""
        now = time.perf_counter()
        if self.stage is not None:
            self._timings[self.stage] = self._timings.get(self.stage, 0.0) + (now - self._stage_started)
        self.stage, self._stage_started = stage, now
        self._publish(step, steps)

    def progress(self, stage: str, step: int | None, steps: int | None) -> None:
        """The engine's progress callback: a new stage, or the next step within the current one.

        Steps within a stage are published at most every ``MIN_STEP_INTERVAL_S`` (the last one
        always), so millisecond steps do not cost a Redis write each.
        """
        if stage != self.stage:
            self.enter(stage, step, steps)
        elif step == steps or time.perf_counter() - self._published >= MIN_STEP_INTERVAL_S:
            self._publish(step, steps)

    def timings(self) -> dict[str, float]:
        """Seconds per stage so far (the current stage included) and ``total``."""
        now = time.perf_counter()
        out = dict(self._timings)
        if self.stage is not None:
            out[self.stage] = out.get(self.stage, 0.0) + (now - self._stage_started)
        out["total"] = now - self._started
        return {name: round(seconds, 4) for name, seconds in out.items()}

    def close(self) -> None:
        """Wait until every update of this render is sent: call before its final state is written."""
        PUBLISHER.drain()

    def _publish(self, step: int | None, steps: int | None) -> None:
        self._published = time.perf_counter()
        meta: dict[str, Any] = {"stage": self.stage}
        if steps is not None:
            meta.update(step=step, steps=steps)
        if self._task.request.id is None:
            return
        PUBLISHER.submit(self._task, self._task.request, meta)


class ProgressPublisher:
    """Writes ``PROGRESS`` states and sends ``task-progress`` events from one thread per process.

    Each update is a state write and an event (two Redis round trips, about 1 ms together on
    loopback, more over a network); made inline they paused the render about eight times per
    video. The render's thread now only queues them; this thread sends them in order, and
    ``drain()`` waits until all are out. The task drains before its final state (SUCCESS,
    FAILURE, REVOKED, RETRY) is written, so a late ``PROGRESS`` never overwrites it.
    """

    def __init__(self, drain_timeout_s: float = 30.0) -> None:
        self._queue: queue.Queue[tuple[Any, Any, dict[str, Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._drain_timeout_s = drain_timeout_s

    def submit(self, task: Any, request: Any, meta: dict[str, Any]) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._start()
        self._queue.put((task, request, meta))

    def drain(self) -> None:
        """Block until every submitted update is sent (or ``drain_timeout_s`` passed)."""
        if self._thread is None or self._pid != os.getpid():
            return
        done = threading.Event()
        self._queue.put((None, done, {}))
        if not done.wait(self._drain_timeout_s):
            log.warning("progress updates still unsent after %.0fs (is Redis reachable?)", self._drain_timeout_s)

    def _start(self) -> None:
        self._queue = queue.Queue()  # after a fork the parent's queue and thread are not ours
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="progress-publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            task, request, meta = self._queue.get()
            if task is None:
                request.set()  # a drain marker: everything before it is sent
                continue
            try:
                task.backend.store_result(request.id, meta, PROGRESS, request=request)
            except Exception as exc:  # noqa: BLE001 - progress must never fail a render
                log.warning("could not write the progress of %s: %s", request.id, exc)
            if task.app.conf.worker_send_task_events:
                # Monitors (Flower) only see events: a custom "task-progress" event puts the stage
                # and step on the task there too.
                try:
                    with task.app.events.default_dispatcher(hostname=request.hostname) as dispatcher:
                        dispatcher.send("task-progress", uuid=request.id, retry=False, **meta)
                except Exception as exc:  # noqa: BLE001
                    log.debug("could not send a task-progress event: %s", exc)


PUBLISHER = ProgressPublisher()
