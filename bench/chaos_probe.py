"""The chaos soak's probe inside each worker: one line per delivery's start and end and per denoising step.

Loaded by the soak's workers only, through Celery's ``--include`` (``CELERY_WORKER_INCLUDE``, after
``tests.pacing``), in the main process before the pool forks. It watches the render from two places
the farm's own accounting does not pass through: Celery's ``task_prerun``/``task_postrun`` signals
(a delivery began; it ended, in which state) and the engine's progress callback (the engine reports
denoising step k of n done, before the pipeline decides anything about it). Each observation is one
line in the worker's log, with the wall-clock time and the pool process's pid::

    chaos-probe {"e": "start", "task": "<id>", "pid": 123, "t": 1765100000.123, "retries": 0}
    chaos-probe {"e": "step", "task": "<id>", "pid": 123, "t": ..., "step": 7, "steps": 40}
    chaos-probe {"e": "end", "task": "<id>", "pid": 123, "t": ..., "state": "SUCCESS"}

A delivery whose process is killed has no ``end`` line. ``bench.chaos_check`` reads these lines.
Never loaded by the project's own code.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import signals

__all__ = ["PREFIX", "emit"]

PREFIX = "chaos-probe "
_current: dict[str, str | None] = {"task": None}


def emit(event: str, **fields: Any) -> None:
    line = {"e": event, "task": _current["task"], "pid": os.getpid(), "t": round(time.time(), 4), **fields}
    print(PREFIX + json.dumps(line, separators=(",", ":")), flush=True)


@signals.task_prerun.connect
def _started(sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) != "tasks.render":
        return
    _current["task"] = task_id
    emit("start", retries=getattr(task.request, "retries", 0))


@signals.task_postrun.connect
def _ended(sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    if getattr(sender, "name", None) != "tasks.render":
        return
    emit("end", state=state)
    _current["task"] = None


@signals.worker_process_init.connect
def _watch_the_engine(**_: Any) -> None:
    """Wrap the diffusers engine's ``render`` so its progress callback is seen first, here."""
    from tasks.engines.diffusers_engine import DiffusersEngine

    render = DiffusersEngine.render
    if getattr(render, "_chaos_probe", False):
        return

    def watched(self: Any, spec: dict[str, Any], progress: Any, *args: Any, **kwargs: Any) -> Any:
        def seen(stage: str, step: int | None, steps: int | None) -> None:
            if stage == "denoising" and step:
                emit("step", step=step, steps=steps)
            progress(stage, step, steps)

        return render(self, spec, seen, *args, **kwargs)

    watched._chaos_probe = True  # type: ignore[attr-defined]
    DiffusersEngine.render = watched  # type: ignore[method-assign]
