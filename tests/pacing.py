"""Test-only pacing: every denoising step of a real render takes at least ``PACE_STEP_S`` seconds.

Tests that act while a render runs (cancel it, kill or pause its worker, list it, queue others
behind it) need that render to last, whatever the CPU. Step counts alone do not do it: a CI
machine with more cores finished the "slow" renders before the tests could act. A worker started
with the environment in ``tests.support.PACED`` imports this module through Celery's own
``--include`` option (``CELERY_WORKER_INCLUDE``) in its main process, before the pool forks, so
the pool children inherit it. The render itself is untouched: the engine computes every step; this
only waits out the rest of ``PACE_STEP_S`` after each step's progress report, and prints each
denoising step reported (``tests.pacing: denoising step 5 of 40``), so a test can tell how far a
render got before its worker was killed. Never loaded by the project's own code.
"""

from __future__ import annotations

import os
import time

from tasks.pipeline.progress import StageClock

PACE_STEP_S = float(os.environ.get("PACE_STEP_S", "0.1"))

_report = StageClock.progress


def _paced(self: StageClock, stage: str, step: int | None, steps: int | None) -> None:
    _report(self, stage, step, steps)
    now = time.perf_counter()
    if step:  # a step ended: wait out the rest of its pace, counted from the previous report
        if stage == "denoising":
            print(f"tests.pacing: denoising step {step} of {steps}", flush=True)
        time.sleep(max(0.0, PACE_STEP_S - (now - getattr(self, "_paced_at", now))))
    self._paced_at = time.perf_counter()  # type: ignore[attr-defined]


StageClock.progress = _paced  # type: ignore[method-assign]
print(f"tests.pacing: every render step takes at least {PACE_STEP_S} s in this worker", flush=True)
