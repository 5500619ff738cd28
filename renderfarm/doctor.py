"""``renderfarm doctor``: is this machine ready to produce or render?

Checks, each with one line and the fix where known: the settings, the broker (Redis answers, the
render queue's depth, workers answering; a refused password and a plain ``redis://`` to a server
that speaks TLS are named as such: ``worker_config.redis_link.diagnose``), object storage (the bucket with the workers'
credentials), webhooks (secret and allow-list), then the worker self-check from
``tasks.worker.selfcheck`` (PyTorch, CUDA, GPU, FastVideo, /dev/shm, a real spawn pool, the
engine a worker here would load). A producer-only install (no torch) skips the worker part.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from tasks.worker.selfcheck import Check

if TYPE_CHECKING:
    from worker_config.settings import Settings

__all__ = ["Check", "run_doctor"]


def _broker(settings: Settings) -> list[Check]:
    from worker_config.celery_config import RENDER_QUEUE, priority_lists
    from worker_config.redis_link import diagnose, is_sentinel, redis_client

    client = redis_client(settings, timeout_s=3, connect_timeout_s=3)
    where = (
        "the Redis master named by REDIS_SENTINEL_MASTER" if is_sentinel(settings.REDIS_URL) else "Redis at REDIS_URL"
    )
    try:
        version = client.info("server").get("redis_version", "?")
        depth = sum(int(client.llen(key)) for key in priority_lists(RENDER_QUEUE))  # type: ignore[arg-type]
        if is_sentinel(settings.REDIS_URL):
            host, port = client.connection_pool.get_master_address()  # type: ignore[attr-defined]
            version = f"{version}, master {settings.REDIS_SENTINEL_MASTER} at {host}:{port} (from the sentinels)"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        if (fault := diagnose(settings.REDIS_URL, exc)) is not None:  # a password refused, TLS expected
            return [Check("broker", False, fault.what, fault.fix)]
        return [Check("broker", False, f"{where} does not answer: {type(exc).__name__}: {exc}",
                        "start Redis or fix REDIS_URL (redis://:PASSWORD@host:6379/0)")]  # fmt: skip
    finally:
        client.close()
    return [Check("broker", True, f"Redis {version}; {depth} render(s) waiting in queue 'render'")]


def _workers() -> Check:
    from tasks.celery import app

    app.conf.broker_connection_retry = False
    app.conf.broker_connection_timeout = 3
    try:
        replies = app.control.ping(timeout=1.5) or []  # a list: two workers of one name answer twice
    except Exception as exc:  # noqa: BLE001
        return Check("workers", False, f"cannot ask workers: {exc}")
    if not replies:
        return Check("workers", True, "none answering (renders wait in the queue until one starts)")
    names = [name for reply in replies for name in reply]
    clashing = sorted({name for name in names if names.count(name) > 1})
    if clashing:
        detail = f"several workers answer as {', '.join(clashing)}: they hide each other and share a health folder"
        return Check("workers", False, detail, "give each worker its own name (renderfarm worker --name, celery -n)")
    return Check("workers", True, f"{len(names)} answering: {', '.join(sorted(names))}")


def _storage(settings: Settings) -> Check:
    from tasks.errors import StorageUnavailable
    from tasks.pipeline.storage import VideoStore

    try:
        store = VideoStore(settings)
        exists = store._client.bucket_exists(store.bucket)  # a read-only probe
    except StorageUnavailable as exc:
        return Check("storage", False, str(exc), "set MINIO_ACCESS_KEY and MINIO_SECRET_KEY (workers need them)")
    except Exception as exc:  # noqa: BLE001
        return Check("storage", False, f"{settings.MINIO_ENDPOINT}: {type(exc).__name__}: {exc}",
                       "check MINIO_ENDPOINT, MINIO_SECURE and the credentials")  # fmt: skip
    detail = f"{settings.MINIO_ENDPOINT}, bucket {settings.MINIO_BUCKET!r} " + (
        "exists" if exists else "missing (the first worker upload creates it)"
    )
    return Check("storage", True, detail)


def _webhooks(settings: Settings) -> Check:
    if not settings.WEBHOOK_SECRET:
        return Check("webhooks", True, "off (WEBHOOK_SECRET unset: requests with webhook_url are refused)")
    if not settings.WEBHOOK_ALLOWED_HOSTS.strip():
        return Check("webhooks", False, "WEBHOOK_SECRET is set but WEBHOOK_ALLOWED_HOSTS is empty",
                       "list the receivers' hosts in WEBHOOK_ALLOWED_HOSTS")  # fmt: skip
    return Check("webhooks", True, f"on, allowed hosts: {settings.WEBHOOK_ALLOWED_HOSTS}")


def _worker_checks(settings: Settings) -> list[Check]:
    if importlib.util.find_spec("torch") is None:
        return [Check("worker", True, "PyTorch not installed: a producer-only install (workers need the worker extra)")]
    from tasks.engines.tiny_wan import TINY_MODELS
    from tasks.errors import FatalWorkerError
    from tasks.worker import selfcheck

    found = selfcheck.run_checks(settings)
    try:
        chosen = selfcheck.plan(settings, found)
    except FatalWorkerError as exc:
        return [*found, Check("model", False, f"MODEL_ID={settings.MODEL_ID}: nothing can render here: {exc}")]
    where = "built in" if settings.MODEL_ID in TINY_MODELS else "downloaded on a worker's first load unless cached"
    detail = f"MODEL_ID={settings.MODEL_ID} ({where}) on ENGINE={chosen.engine}"
    if chosen.fallback:
        detail += f" (fallback: {chosen.reason})"
    return [*found, Check("model", True, detail)]


def run_doctor(settings: Settings, worker: bool = True) -> list[Check]:
    findings = _broker(settings)
    if findings[0].ok:
        findings.append(_workers())
    findings += [_storage(settings), _webhooks(settings)]
    if worker:
        findings += _worker_checks(settings)
    return findings
