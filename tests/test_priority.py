"""Priorities through a real Celery worker and Redis: a high-priority request overtakes queued low ones.

The worker runs in this process (pytest-celery's ``celery_worker``) with this project's worker
configuration: the order is the broker's and the consumer's, which no pool or render changes.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from tests.support import ROOT, wait_for


def send(producer, priority: int | None, **kwargs):
    options = {} if priority is None else {"priority": priority}
    return producer.send_task("tasks.render", kwargs=kwargs, queue="render", **options)


@pytest.fixture
def busy_worker(in_process_worker):
    """A Celery worker in this process with this project's worker configuration (prefetch 1, late acks,
    kombu's priority lists) on the real Redis; its ``tasks.render`` records each request and holds the
    first one until ``release`` is set, so the queue fills behind a busy worker without a paced render.

    What is tested is the broker's and the consumer's order (worker_config/celery_config.py), not the
    render, which tests/test_render_e2e.py runs in real prefork workers.
    """
    taken: list[str] = []
    release = threading.Event()

    def render(self, prompt: str, **_: object) -> str:
        taken.append(prompt)
        if len(taken) == 1:
            release.wait(60)
        return prompt

    in_process_worker({"tasks.render": render})
    try:
        yield taken, release
    finally:
        release.set()


def test_a_busy_worker_takes_high_before_normal_before_low(busy_worker, producer):
    taken, release = busy_worker
    busy = send(producer, 3, prompt="keeps the worker busy")
    wait_for(lambda: taken == ["keeps the worker busy"], 30, "the first request to start")
    # Sent in the worst order: low first, high last.
    results = [send(producer, priority, prompt=prompt) for priority, prompt in
               [(9, "low 1"), (9, "low 2"), (3, "normal"), (None, "no priority"), (0, "high")]]  # fmt: skip
    release.set()
    for result in (busy, *results):
        result.get(timeout=60)
    # Without a priority a message counts as 0 on Redis, the highest (hence `priority=3` in docs/api.md).
    assert taken == ["keeps the worker busy", "no priority", "high", "normal", "low 1", "low 2"]


def test_cli_submit_priority_goes_to_the_matching_redis_list(worker_env, redis_server):
    def submit(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "renderfarm.cli", "submit", "a fox", *args], cwd=ROOT, env=worker_env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    submit("--priority", "high")
    submit("--priority", "low")
    submit()  # normal by default
    sep = "\x06\x16"  # kombu's default, which this project keeps (see worker_config/celery_config.py)
    lengths = {key: redis_server.client.llen(key) for key in ("render", f"render{sep}3", f"render{sep}9")}
    assert lengths == {"render": 1, f"render{sep}3": 1, f"render{sep}9": 1}
    bad = subprocess.run(
        [sys.executable, "-m", "renderfarm.cli", "submit", "a fox", "--priority", "urgent"], cwd=ROOT, env=worker_env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "urgent" in bad.stderr
