"""The background progress publisher: updates leave in order, and drain() returns only once all are out."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from tasks.progress import PROGRESS, ProgressPublisher


class SlowBackend:
    """Records state writes; each takes 20 ms, like a slow Redis round trip."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, dict, str, str]] = []

    def store_result(self, task_id: str, meta: dict, state: str, request: object = None) -> None:
        time.sleep(0.02)
        self.writes.append((task_id, meta, state, threading.current_thread().name))


def fake_task(backend: SlowBackend) -> SimpleNamespace:
    conf = SimpleNamespace(worker_send_task_events=False)
    return SimpleNamespace(backend=backend, app=SimpleNamespace(conf=conf))


def test_updates_are_sent_in_order_off_the_render_thread_and_drain_waits_for_them():
    backend = SlowBackend()
    publisher = ProgressPublisher()
    request = SimpleNamespace(id="task-1", hostname="w@h")
    started = time.perf_counter()
    for step in range(5):
        publisher.submit(fake_task(backend), request, {"stage": "denoising", "step": step, "steps": 4})
    queued_in = time.perf_counter() - started
    publisher.drain()

    assert queued_in < 0.02  # the render's thread did not wait for the five 20 ms writes
    assert [w[1]["step"] for w in backend.writes] == [0, 1, 2, 3, 4]  # all of them, in order, before drain returned
    assert {w[2] for w in backend.writes} == {PROGRESS}
    assert {w[3] for w in backend.writes} == {"progress-publisher"}


def test_a_failing_write_is_logged_and_the_next_ones_still_go_out(caplog):
    class FlakyBackend(SlowBackend):
        def store_result(self, task_id: str, meta: dict, state: str, request: object = None) -> None:
            if meta["step"] == 1:
                raise ConnectionError("redis went away")
            super().store_result(task_id, meta, state, request)

    backend = FlakyBackend()
    publisher = ProgressPublisher()
    request = SimpleNamespace(id="task-2", hostname="w@h")
    for step in range(3):
        publisher.submit(fake_task(backend), request, {"stage": "denoising", "step": step, "steps": 2})
    publisher.drain()
    assert [w[1]["step"] for w in backend.writes] == [0, 2]
    assert "could not write the progress of task-2: redis went away" in caplog.text
