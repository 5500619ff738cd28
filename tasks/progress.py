"""Progress and timings of one render: task states a producer reads, and events Flower shows.

``StageClock`` moves the task through stages (``PROGRESS`` state with ``{"stage", "step",
"steps"}`` as its info) and records the seconds spent in each; ``timings()`` is what the
result reports.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["MIN_STEP_INTERVAL_S", "PROGRESS", "StageClock"]

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

    def _publish(self, step: int | None, steps: int | None) -> None:
        self._published = time.perf_counter()
        meta: dict[str, Any] = {"stage": self.stage}
        if steps is not None:
            meta.update(step=step, steps=steps)
        if self._task.request.id is None:
            return
        self._task.update_state(state=PROGRESS, meta=meta)
        if self._task.app.conf.worker_send_task_events:
            # Monitors (Flower) only see events: a custom "task-progress" event puts the stage and
            # step on the task there too. Monitoring must never fail a render.
            try:
                self._task.send_event("task-progress", retry=False, **meta)
            except Exception as exc:  # noqa: BLE001
                log.debug("could not send a task-progress event: %s", exc)
