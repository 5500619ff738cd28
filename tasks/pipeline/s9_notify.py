"""Stage 9, notify: when a render with a ``webhook_url`` succeeds or fails, queue its delivery.

Runs in the pool process from Celery's ``task_success`` / ``task_failure`` signals (the render
task itself knows nothing of webhooks) and sends ``tasks.deliver_webhook``
(``tasks.pipeline.webhook_delivery``) at the top priority to ``WEBHOOK_QUEUE``. The body
(``tasks.webhook.body_for``) is::

    {"event": "render.succeeded" | "render.failed", "task_id": ..., "delivery_id": "<task id>:<event>",
     "state": "SUCCESS" | "FAILURE", "result": {...} | null, "error": {"type", "message"} | null,
     "timestamp": <unix seconds of this attempt>}

``delivery_id`` is the same on every retry (and on a redelivered render): receivers deduplicate on it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from tasks.pipeline.events import render_stored
from tasks.pipeline.resources import webhook_policy
from tasks.webhook import check_url
from worker_config.celery_config import PRIORITIES
from worker_config.settings import get_settings

__all__ = ["install", "event_payload"]

log = logging.getLogger("renderfarm.webhooks")
RENDER_TASK = "tasks.render"


def event_payload(task_id: str, event: str, result: Any = None, error: BaseException | None = None) -> dict[str, Any]:
    return {
        "event": event,
        "task_id": task_id,
        "delivery_id": f"{task_id}:{event}",
        "state": "SUCCESS" if error is None else "FAILURE",
        "result": result if error is None else None,
        "error": None if error is None else {"type": type(error).__name__, "message": str(error)},
    }


def _queue(url: Any, payload: dict[str, Any]) -> None:
    from tasks.pipeline.webhook_delivery import deliver_webhook  # declared at worker start (tasks.worker.lifecycle)

    if not isinstance(url, str):
        return
    try:  # a URL the request validation refused is never called; no DNS lookup here (the delivery resolves)
        check_url(url, webhook_policy(), resolve=False)
    except ValueError as exc:
        log.info("no webhook for %s: %s", payload["task_id"], exc)
        return
    deliver_webhook.apply_async(
        kwargs={"url": url, "payload": payload}, queue=get_settings().WEBHOOK_QUEUE, priority=PRIORITIES["high"]
    )
    log.info("webhook %s queued for %s", payload["event"], payload["task_id"])


def _on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) == RENDER_TASK:
        _on_render_stored(task_id=sender.request.id, kwargs=sender.request.kwargs, result=result)


def _on_render_stored(
    sender: Any = None, task_id: str | None = None, kwargs: dict[str, Any] | None = None, result: Any = None, **_: Any
) -> None:
    """A render's video is stored: from ``task_success``, or in buffer mode from the background upload."""
    url = (kwargs or {}).get("webhook_url")
    if url and task_id:
        _queue(url, event_payload(task_id, "render.succeeded", result=result))


def _on_failure(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
    kwargs: dict[str, Any] | None = None, **_: Any,
) -> None:  # fmt: skip
    if getattr(sender, "name", None) != RENDER_TASK or not task_id:
        return
    url = (kwargs or {}).get("webhook_url")
    if url:
        error = exception if exception is not None else RuntimeError("unknown error")
        _queue(url, event_payload(task_id, "render.failed", error=error))


def install(app: Any) -> None:
    signals.task_success.connect(_on_success, weak=False)
    render_stored.connect(_on_render_stored, weak=False)
    signals.task_failure.connect(_on_failure, weak=False)
