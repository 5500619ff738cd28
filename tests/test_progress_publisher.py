"""The background progress publisher: latest update wins within the interval; drain() returns once it is out."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import pytest

from tasks.pipeline.progress import PROGRESS, ProgressPublisher
from tests.support import wait_for


class SlowBackend:
    """Records state writes; each takes 20 ms, like a slow Redis round trip."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, dict, str, str]] = []

    def store_result(self, task_id: str, meta: dict, state: str, request: object = None) -> None:
        time.sleep(0.02)
        self.writes.append((task_id, meta, state, threading.current_thread().name))


def record(backend: SlowBackend, task_id: str, meta: dict) -> None:
    """The publisher's write, into the recording backends below."""
    backend.store_result(task_id, meta, PROGRESS)


def fake_task(backend: SlowBackend) -> SimpleNamespace:
    conf = SimpleNamespace(worker_send_task_events=False)
    return SimpleNamespace(backend=backend, app=SimpleNamespace(conf=conf))


def submit_steps(publisher: ProgressPublisher, backend: SlowBackend, task_id: str, steps: range) -> float:
    """Hand over one update per step as fast as a render would; returns the seconds it took."""
    request = SimpleNamespace(id=task_id, hostname="w@h")
    started = time.perf_counter()
    for step in steps:
        publisher.submit(fake_task(backend), request, {"stage": "denoising", "step": step, "steps": 9})
    return time.perf_counter() - started


class GatedBackend(SlowBackend):
    """Every write waits at a gate until the test opens it: a Redis that does not answer yet."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def store_result(self, task_id: str, meta: dict, state: str, request: object = None) -> None:
        self.gate.wait(30)
        super().store_result(task_id, meta, state, request)


def test_a_burst_of_updates_sends_the_first_and_the_latest_off_the_render_thread():
    backend = GatedBackend()
    publisher = ProgressPublisher(min_interval_s=0.1, store=record)
    handed_over = threading.Event()

    def render() -> None:
        submit_steps(publisher, backend, "task-1", range(5))
        handed_over.set()

    threading.Thread(target=render, daemon=True).start()
    # The render's thread handed over all five while the first write was still held at the gate:
    # it never waits on Redis.
    assert handed_over.wait(10) and backend.writes == []
    backend.gate.set()
    publisher.drain()
    # At most the first update (if the thread took it before the next one came) and the latest
    # went out: the rest were superseded within the interval. drain() sent the latest and returned
    # only once it was written.
    steps = [w[1]["step"] for w in backend.writes]
    assert steps in ([4], [0, 4])
    assert {w[2] for w in backend.writes} == {PROGRESS}
    assert {w[3] for w in backend.writes} == {"progress-publisher"}


def test_a_pending_update_goes_out_once_the_interval_has_passed_without_a_drain():
    backend = SlowBackend()
    publisher = ProgressPublisher(min_interval_s=0.1, store=record)
    submit_steps(publisher, backend, "task-1", range(2))  # a long stage: nothing else is handed over, no drain
    wait_for(lambda: [w[1]["step"] for w in backend.writes][-1:] == [1], 5, "the held-back update to go out")
    publisher.drain()


def test_the_next_renders_first_update_is_not_held_back():
    backend = SlowBackend()
    publisher = ProgressPublisher(min_interval_s=30.0, store=record)  # a held-back update would wait 30 s
    submit_steps(publisher, backend, "task-1", range(2))
    wait_for(lambda: backend.writes, 5, "the first render's first update")
    submit_steps(publisher, backend, "task-2", range(1))  # the next render's first update
    wait_for(lambda: ("task-2", 0) in [(w[0], w[1]["step"]) for w in backend.writes], 5, "task-2's first update")
    publisher.drain()


def test_a_failing_write_is_logged_and_the_next_ones_still_go_out(caplog):
    class FlakyBackend(SlowBackend):
        attempts = 0

        def store_result(self, task_id: str, meta: dict, state: str, request: object = None) -> None:
            self.attempts += 1
            if meta["step"] == 1:
                raise ConnectionError("redis went away")
            super().store_result(task_id, meta, state, request)

    caplog.set_level(logging.WARNING, logger="renderfarm.progress")
    backend = FlakyBackend()
    publisher = ProgressPublisher(min_interval_s=0.0, store=record)
    request = SimpleNamespace(id="task-2", hostname="w@h")
    for step in range(3):
        publisher.submit(fake_task(backend), request, {"stage": "denoising", "step": step, "steps": 2})
        wait_for(lambda step=step: backend.attempts == step + 1, 5, f"step {step} to be tried")
    publisher.drain()
    assert [w[1]["step"] for w in backend.writes] == [0, 2]
    assert "could not write the progress of task-2: redis went away" in caplog.text


def test_settle_drops_the_pending_update_and_waits_for_the_one_being_sent():
    """Before a final state: nothing pending goes out after it, and what is being sent has landed."""

    class Watched(SlowBackend):
        def __init__(self) -> None:
            super().__init__()
            self.sending = threading.Event()

        def store_result(self, task_id: str, meta: dict, state: str, request: object = None) -> None:
            self.sending.set()
            super().store_result(task_id, meta, state, request)

    backend = Watched()
    publisher = ProgressPublisher(min_interval_s=0.1, store=record)
    submit_steps(publisher, backend, "task-1", range(1))  # a render's first update goes out at once
    assert backend.sending.wait(5)  # ... and is being written (20 ms)
    submit_steps(publisher, backend, "task-1", range(1, 3))  # held back: within the interval
    publisher.settle("task-1")
    assert [w[1]["step"] for w in backend.writes] == [0]  # the write in flight landed before settle returned
    time.sleep(0.3)  # well past the interval
    assert [w[1]["step"] for w in backend.writes] == [0]  # the pending update was dropped, never sent
    publisher.drain()  # nothing left to send
    assert [w[1]["step"] for w in backend.writes] == [0]


def test_settle_concerns_one_task_only():
    """Buffer mode settles a finished task from its upload thread while the next one renders."""

    class Gated(SlowBackend):
        def __init__(self) -> None:
            super().__init__()
            self.sending, self.release = threading.Event(), threading.Event()

        def store_result(self, task_id: str, meta: dict, state: str, request: object = None) -> None:
            self.sending.set()
            assert self.release.wait(5)
            super().store_result(task_id, meta, state, request)

    backend = Gated()
    publisher = ProgressPublisher(min_interval_s=0.1, store=record)
    submit_steps(publisher, backend, "next", range(1))
    assert backend.sending.wait(5)  # the next task's first update is being written, held by the gate
    submit_steps(publisher, backend, "next", range(1, 2))  # and its step 1 is pending
    publisher.settle("finished")  # returns at once: nothing of "finished" is pending or being sent
    assert backend.writes == []
    backend.release.set()
    publisher.drain()
    assert [(w[0], w[1]["step"]) for w in backend.writes] == [("next", 0), ("next", 1)]  # nothing dropped


class RacingBackend:
    """A real Redis result backend that lets another worker write the task's final state right
    between the progress write's read and its write (a node paused there, then resumed)."""

    def __init__(self, backend, other_worker) -> None:
        self._backend, self._other = backend, other_worker

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def decode_result(self, payload):
        self._other()  # the other worker finishes now
        return self._backend.decode_result(payload)


@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")  # Celery's own write, redis-py 8
def test_a_progress_write_never_replaces_a_final_state(redis_server):
    from celery import Celery, states

    from tasks.pipeline.progress import store_progress

    redis_server.client.flushall()
    app = Celery("progress-race", broker=redis_server.url, backend=redis_server.url)
    backend = app.backend
    try:
        assert store_progress(backend, "t1", {"stage": "denoising", "step": 1, "steps": 9})
        assert backend.get_task_meta("t1")["status"] == PROGRESS

        # The other worker's SUCCESS lands between this write's read and its write: this write yields.
        racing = RacingBackend(backend, lambda: backend.store_result("t1", {"key": "k"}, states.SUCCESS))
        assert store_progress(racing, "t1", {"stage": "denoising", "step": 2, "steps": 9}) is False
        meta = backend.get_task_meta("t1", cache=False)
        assert (meta["status"], meta["result"]) == (states.SUCCESS, {"key": "k"})

        # And once the state is final, a late update is refused outright.
        assert store_progress(backend, "t1", {"stage": "denoising", "step": 3, "steps": 9}) is False
        assert backend.get_task_meta("t1", cache=False)["status"] == states.SUCCESS
    finally:
        app.close()
