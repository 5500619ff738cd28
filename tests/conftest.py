"""Fixtures: a real Redis, a real HTTP S3 endpoint and real Celery worker processes.

The producer side of every queue test is a plain ``Celery(broker=..., backend=...)`` app that
knows nothing of this project (``send_task("tasks.render", ...)``), exactly like a foreign
producer. Each test that starts workers gets its own bucket and an empty Redis database.
"""

from __future__ import annotations

import gc
import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.support import RedisServer, S3Server, TestWorker, minio_client

_names = itertools.count(1)


@pytest.fixture(autouse=True)
def _collect_this_tests_garbage() -> Iterator[None]:
    """Collect each test's reference cycles as it ends: a socket or file it leaked inside one is
    reported against that test (an unraisable ResourceWarning, an error under filterwarnings=error),
    not against whichever later test happens to run a full collection."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache with tiny-wan built once for the whole session."""
    from tasks.engines.tiny_wan import ensure_tiny_wan

    cache = tmp_path_factory.mktemp("models")
    ensure_tiny_wan(cache)
    return cache


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def bucket() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def worker_env(
    redis_server: RedisServer, s3_server: S3Server, model_cache: Path, bucket: str, tmp_path: Path
) -> dict[str, str]:
    """The environment of a worker: only the documented settings (plus PATH and the like)."""
    redis_server.client.flushall()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "REDIS_", "MODEL_", "ENGINE"))}
    env.update(
        REDIS_URL=redis_server.url,
        MINIO_ENDPOINT=s3_server.endpoint,
        MINIO_PUBLIC_ENDPOINT=f"http://localhost:{s3_server.port}",
        MINIO_ACCESS_KEY="test-access",
        MINIO_SECRET_KEY="test-secret",
        MINIO_BUCKET=bucket,
        MODEL_ID="tiny-wan",
        MODEL_CACHE_DIR=str(model_cache),
        SPOOL_DIR=str(tmp_path / "spool"),
        HEALTH_DIR=str(tmp_path / "health"),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def start_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., TestWorker]]:
    """Start real worker processes: ``start_worker(wait=True, **env_overrides)``."""
    started: list[TestWorker] = []

    def start(
        wait: bool = True, args: tuple[str, ...] = (), wrap: tuple[str, ...] = (), **overrides: str
    ) -> TestWorker:
        name = f"w{next(_names)}"
        worker = TestWorker(
            name,
            {**worker_env, **overrides},
            tmp_path / f"{name}.log",
            ("--without-mingle", "--without-gossip", *args),
            wrap=wrap,
        )
        started.append(worker)
        return worker.wait_ready() if wait else worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def producer(redis_server: RedisServer) -> Iterator[Celery]:
    """A producer that does not import this project: a plain Celery client on the same Redis."""
    app = Celery("producer", broker=redis_server.url, backend=redis_server.url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    yield app
    app.close()


@pytest.fixture
def s3(s3_server: S3Server):
    return minio_client(s3_server)
