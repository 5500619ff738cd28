"""Priorities through a real worker and Redis: a high-priority render overtakes queued low ones."""

from __future__ import annotations

import subprocess
import sys

from tests.support import PACED, ROOT, wait_for

SMALL = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 1}
SLOW = {"num_frames": 9, "height": 64, "width": 64, "num_inference_steps": 30}  # paced: 3 s or more


def send(producer, priority: int | None, **kwargs):
    options = {} if priority is None else {"priority": priority}
    return producer.send_task("tasks.render", kwargs=kwargs, queue="render", **options)


def test_a_busy_worker_takes_high_before_normal_before_low(start_worker, producer):
    start_worker(**PACED)
    slow = send(producer, 3, prompt="keeps the worker busy", **SLOW)
    wait_for(lambda: slow.state in ("STARTED", "PROGRESS"), 60, "the slow render to start")
    # Sent in the worst order: low first, high last.
    low1 = send(producer, 9, prompt="low 1", **SMALL)
    low2 = send(producer, 9, prompt="low 2", **SMALL)
    normal = send(producer, 3, prompt="normal", **SMALL)
    high = send(producer, 0, prompt="high", **SMALL)
    assert slow.state in ("STARTED", "PROGRESS"), "the slow render ended before the others were queued"
    results = {"high": high, "normal": normal, "low1": low1, "low2": low2}
    for result in (slow, *results.values()):
        result.get(timeout=180)
    order = sorted(results, key=lambda name: results[name].date_done)
    assert order == ["high", "normal", "low1", "low2"]


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
