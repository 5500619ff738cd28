"""Test-only pacing: every denoising step of a real render takes at least ``PACE_STEP_S`` seconds,
and a render can be held at a stage boundary until its cancel has been seen.

Tests that act while a render runs (cancel it, kill or pause its worker, list it, queue others
behind it) need that render to last, whatever the CPU. Step counts alone do not do it: a CI
machine with more cores finished the "slow" renders before the tests could act. A worker started
with the environment in ``tests.support.PACED`` imports this module through Celery's own
``--include`` option (``CELERY_WORKER_INCLUDE``) in its main process, before the pool forks, so
the pool children inherit it. The render itself is untouched: the engine computes every step; this
only waits out the rest of ``PACE_STEP_S`` after each step's progress report, and prints each
denoising step reported (``tests.pacing: denoising step 5 of 40``), so a test can tell how far a
render got before its worker was killed. Never loaded by the project's own code.

Holds: a render whose prompt contains ``hold at <point>`` waits at that point (its state already
shows it) until the render's own cancel watch has seen its cancel (at most ``PACE_HOLD_S``), so a
test can cancel it exactly there: ``denoised`` (after the last denoising step was reported),
``decoding``, ``encoding`` or ``uploading`` (on entering that stage). The next stop check then
finds the cancel, with no race against the watch's polling.
"""

from __future__ import annotations

import os
import re
import threading
import time

from tasks.pipeline.cancelling import CancelWatch
from tasks.pipeline.progress import StageClock

PACE_STEP_S = float(os.environ.get("PACE_STEP_S", "0.1"))
PACE_HOLD_S = float(os.environ.get("PACE_HOLD_S", "60"))
HOLD = re.compile(r"hold at (denoised|decoding|encoding|uploading)\b")

_report = StageClock.progress
_enter = StageClock.enter
_watch_enter = CancelWatch.__enter__
_watches: dict[str, CancelWatch] = {}  # the running renders' cancel watches, by task id
_lock = threading.Lock()


def _paced(self: StageClock, stage: str, step: int | None, steps: int | None) -> None:
    _report(self, stage, step, steps)
    now = time.perf_counter()
    if step:  # a step ended: wait out the rest of its pace, counted from the previous report
        if stage == "denoising":
            print(f"tests.pacing: denoising step {step} of {steps}", flush=True)
        time.sleep(max(0.0, PACE_STEP_S - (now - getattr(self, "_paced_at", now))))
    self._paced_at = time.perf_counter()  # type: ignore[attr-defined]
    if stage == "denoising" and steps and step == steps:
        _hold(self, "denoised")


def _held_enter(self: StageClock, stage: str, step: int | None = None, steps: int | None = None) -> None:
    _enter(self, stage, step, steps)
    _hold(self, stage)


def _hold(clock: StageClock, point: str) -> None:
    request = clock._request
    prompt = str((request.kwargs or {}).get("prompt", ""))
    if (found := HOLD.search(prompt)) is None or found[1] != point:
        return
    print(f"tests.pacing: holding {request.id} at {point} until its cancel is seen", flush=True)
    deadline = time.monotonic() + PACE_HOLD_S
    while time.monotonic() < deadline:
        with _lock:
            watch = _watches.get(request.id)
        if watch is not None and watch.requested():
            print(f"tests.pacing: {request.id} goes on from {point}: its cancel was seen", flush=True)
            return
        time.sleep(0.05)
    print(f"tests.pacing: {request.id} goes on from {point}: no cancel within {PACE_HOLD_S}s", flush=True)


def _registered_enter(self: CancelWatch) -> CancelWatch:
    if self._task_id:
        with _lock:
            _watches[self._task_id] = self
    return _watch_enter(self)


StageClock.progress = _paced  # type: ignore[method-assign]
StageClock.enter = _held_enter  # type: ignore[method-assign]
CancelWatch.__enter__ = _registered_enter  # type: ignore[method-assign]
print(f"tests.pacing: every render step takes at least {PACE_STEP_S} s in this worker", flush=True)
