"""Fixtures: a real Redis, a real HTTP S3 endpoint and real Celery worker processes.

The producer side of every queue test is a plain ``Celery(broker=..., backend=...)`` app that
knows nothing of this project (``send_task("tasks.render", ...)``), exactly like a foreign
producer. Each test that starts workers gets its own bucket and an empty Redis database.
"""

from __future__ import annotations

import gc
import itertools
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery, signals

# pytest-celery (the dev extra) enables celery.contrib.pytest's fixtures: `celery_app` (an app built
# from `celery_config`), `celery_worker` (a real Celery worker in a thread of this process, on the
# real Redis). Its own `celery_worker` is a Docker container, which cannot run here: the in-process
# one is re-exported. Where in-process workers are used and where real prefork workers stay: README,
# "Development".
from celery.contrib.pytest import celery_worker  # noqa: F401

from tests.support import RedisServer, S3Server, TestWorker, minio_client, worker_environment

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
    return worker_environment(
        redis_server.url, s3_server.endpoint, bucket, model_cache, tmp_path,
        MINIO_PUBLIC_ENDPOINT=f"http://localhost:{s3_server.port}",
    )  # fmt: skip


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


@pytest.fixture(scope="session")
def celery_config(redis_server: RedisServer) -> dict:
    """``celery_app``'s configuration: a worker's, as this project builds it, on the test Redis."""
    from worker_config.celery_config import celery_config as worker_configuration
    from worker_config.settings import Settings

    return worker_configuration(Settings.model_validate({"REDIS_URL": redis_server.url}))


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict:
    """The in-process worker (``celery_worker``): no ``celery.ping`` task to check it with; it consumes
    ``render`` (a module overrides this fixture for other queues)."""
    return {"perform_ping_check": False, "queues": ["render"]}


@pytest.fixture
def in_process_worker(
    request: pytest.FixtureRequest, celery_app: Celery, redis_server: RedisServer
) -> Iterator[Callable[[dict[str, Callable[..., object]]], object]]:
    """``start({name: body})``: register ``body(self, **kwargs)`` as task ``name`` on ``celery_app`` and start
    ``celery_worker`` (a real Celery worker in a thread of this process) on an empty Redis; the worker.

    For what the broker, the routing and the consumer decide (which queue, which order), not for a
    render: the body stands in for the task and says what it received. The project's own tasks are
    shared tasks (``@app.task``), so every app has them: a body given here replaces that one.
    """
    redis_server.client.flushall()
    backends = [celery_app.backend]  # the app's backends are per thread: this one and the worker thread's

    def worker_backend(sender: object = None, **_: object) -> None:
        backend = sender.app.backend  # type: ignore[attr-defined]
        if all(backend is not b for b in backends):
            backends.append(backend)

    def start(bodies: dict[str, Callable[..., object]]) -> object:
        for name, body in bodies.items():
            celery_app.tasks.pop(name, None)
            celery_app.task(name=name, bind=True)(body)
        return request.getfixturevalue("celery_worker")  # after the tasks: it knows them when it starts

    signals.task_postrun.connect(worker_backend, weak=False)
    root_level = logging.getLogger().level
    try:
        yield start
    finally:
        signals.task_postrun.disconnect(worker_backend)
        # Celery's test worker set the root logger to its own level (ERROR): a later test's caplog
        # would see no warning at all.
        logging.getLogger().setLevel(root_level)
        # The worker has stopped. A task it retried subscribed its thread's backend to the retry's result
        # (a real worker process never does); those subscriptions go here with their connection, or the
        # garbage collector would reconnect to unsubscribe and leave that socket open.
        for backend in backends:
            consumer = getattr(backend, "result_consumer", None)
            if consumer is not None:
                consumer.subscribed_to.clear()
                consumer.stop()


@pytest.fixture
def s3(s3_server: S3Server):
    return minio_client(s3_server)
