"""A Redis with a password, and a REDIS_URL without it or with a wrong one (issue 25, part 8).

An authentication error is not an outage: every producer command, and a Python producer's
``send_task``/``.get()``, answers at once naming the password (missing or wrong), where each used to
retry it as an outage for about 4 minutes and then mislead (a traceback, "the render failed"). A
worker refuses to start, exit code 2. A subprocess timeout of 60 s stands for "within seconds":
the old behaviour took 240 s or more. The outage policy itself is tests/test_redis_outage.py's.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from celery import Celery

from tests.support import ROOT, RedisServer
from worker_config.celery_config import app_config
from worker_config.redis_link import RedisAuthError
from worker_config.settings import BrokerSettings

PASSWORD = "s3cret-pw"
MISSING = "requires a password and REDIS_URL has none"
WRONG = "refused the password in REDIS_URL: the password (or user) is wrong"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("locked-redis"), password=PASSWORD)
    yield server
    server.stop()


def urls(server: RedisServer) -> dict[str, str]:
    return {
        MISSING: f"redis://127.0.0.1:{server.port}/0",
        WRONG: f"redis://:not-{PASSWORD}@127.0.0.1:{server.port}/0",
    }


def renderfarm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # 60 s: "within seconds" with room for a loaded machine; the old behaviour took 240 s or more.
    return subprocess.run([sys.executable, "-m", "renderfarm.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize("case", [MISSING, WRONG])
def test_every_producer_command_names_the_password_at_once(locked_redis: RedisServer, worker_env, case: str):
    env = {**worker_env, "REDIS_URL": urls(locked_redis)[case]}
    # A render that exists: sent with the right password (no worker needed to read its state).
    right = Celery("producer")
    right.conf.update(app_config(BrokerSettings(REDIS_URL=locked_redis.url)))
    task_id = right.send_task("tasks.render", kwargs={"prompt": "waits"}, queue="render").id
    right.close()

    commands = (["submit", "a fox"], ["status", task_id], ["result", task_id, "--timeout", "5"],
                ["cancel", task_id], ["workers"], ["models"], ["doctor", "--producer"])  # fmt: skip
    with ThreadPoolExecutor(len(commands)) as pool:  # side by side: each is mostly its imports
        runs = list(pool.map(lambda args: renderfarm(env, *args), commands))
    said = {}
    for args, done in zip(commands, runs, strict=True):
        said[args[0]] = done.stdout + done.stderr
        assert done.returncode == 1, (args, said[args[0]])
        assert case in said[args[0]] and "Traceback" not in said[args[0]], (args, said[args[0]])
        assert f"render {task_id} failed" not in said[args[0]], (args, said[args[0]])  # it did not: Redis unread
    doctor = said["doctor"].splitlines()
    assert doctor[0].startswith("FAIL broker: Redis at REDIS_URL (redis://") and case in doctor[0], doctor
    fix = "fix: put the password in REDIS_URL: redis://:PASSWORD@host:6379/0 (rediss://... with TLS)"
    assert doctor[1].strip() == fix, doctor


@pytest.mark.timeout(60)  # the old behaviour: 240 s for each call below
def test_a_python_producer_fails_at_once_naming_the_password(locked_redis: RedisServer):
    for case, url in urls(locked_redis).items():
        producer = Celery("producer")
        producer.conf.update(app_config(BrokerSettings(REDIS_URL=url)))
        try:
            with pytest.raises(RedisAuthError, match=re.escape(case)):
                producer.send_task("tasks.render", kwargs={"prompt": "x"}, queue="render")
            with pytest.raises(RedisAuthError, match=re.escape(case)):
                producer.AsyncResult(str(uuid.uuid4())).get(timeout=5)
            with pytest.raises(RedisAuthError, match=re.escape(case)):
                producer.AsyncResult(str(uuid.uuid4())).state  # noqa: B018 - the read is the test
        finally:
            producer.close()


def test_a_worker_with_a_wrong_password_exits_naming_it(locked_redis: RedisServer, start_worker, tmp_path: Path):
    worker = start_worker(wait=False, REDIS_URL=urls(locked_redis)[WRONG])
    assert worker.proc.wait(60) == 2
    assert f"renderfarm worker: FATAL: Redis at REDIS_URL (redis://:***@127.0.0.1:{locked_redis.port}/0) {WRONG}" in (
        worker.log
    )
    assert "engine loaded" not in worker.log  # it stopped before loading a model it could never use
