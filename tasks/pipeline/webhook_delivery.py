"""The ``tasks.deliver_webhook`` task: POST one signed render event to the request's ``webhook_url``.

Declared (registered) in workers only, when they start (``tasks.worker.lifecycle``): its retry
policy comes from the worker's settings. Sent by the worker (``tasks.pipeline.s9_notify``) when a
render succeeds or fails, at the top priority on ``WEBHOOK_QUEUE`` (default: the render queue, so
it runs right after the current render, ahead of any queued one, on any worker started by the
documented command). Retry is
declared here: connection errors, timeouts, 408, 429 and 5xx answers are retried with exponential
backoff (``WEBHOOK_RETRY_BACKOFF_S`` doubling up to ``WEBHOOK_RETRY_BACKOFF_MAX_S``, jittered)
at most ``WEBHOOK_MAX_RETRIES`` times; while it waits the worker holds the message (it is not
blocking the pool). Other answers (3xx, 4xx) are final: the receiver said no. Each attempt checks
the URL against the allow-list again and connects only to the addresses it checked.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

from celery import Task
from celery.utils.log import get_task_logger

from tasks.celery import app
from tasks.errors import RenderError, TransientError
from tasks.pipeline.resources import webhook_policy
from tasks.webhook import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    RedactingTask,
    Target,
    UnresolvedHost,
    body_for,
    check_url,
    redact,
    sign,
)
from worker_config.settings import get_settings

__all__ = ["deliver_webhook", "WebhookFailed", "WebhookRejected"]

log = get_task_logger(__name__)
_settings = get_settings()
_RETRY_STATUS = {408, 425, 429}


class WebhookFailed(TransientError):
    """The receiver could not be reached or answered 408/429/5xx; worth trying again."""


class WebhookRejected(RenderError):
    """The URL is not allowed (any more), or the receiver refused the delivery; never retried."""


@app.task(
    bind=True,
    base=RedactingTask,  # the URL's query (a token?) never shows in events or logs
    name="tasks.deliver_webhook",
    autoretry_for=(WebhookFailed,),
    retry_backoff=_settings.WEBHOOK_RETRY_BACKOFF_S,
    retry_backoff_max=_settings.WEBHOOK_RETRY_BACKOFF_MAX_S,
    retry_jitter=True,
    max_retries=_settings.WEBHOOK_MAX_RETRIES,
    throws=(WebhookRejected,),
    soft_time_limit=_settings.WEBHOOK_TIMEOUT_S * 4 + 10,
    time_limit=_settings.WEBHOOK_TIMEOUT_S * 4 + 20,
)
def deliver_webhook(self: Task, url: str, payload: dict[str, Any]) -> dict[str, Any]:
    """POST ``payload`` (with a fresh ``timestamp``), signed; return the receiver's status code."""
    settings = get_settings()
    try:
        target = check_url(url, webhook_policy())
    except UnresolvedHost as exc:
        raise WebhookFailed(f"webhook {redact(url)}: {exc}") from None
    except ValueError as exc:
        raise WebhookRejected(f"webhook {redact(url)} not delivered: {exc}") from None
    secret = settings.WEBHOOK_SECRET or ""
    body = body_for(payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "renderfarm-webhook/1",
        SIGNATURE_HEADER: sign(body, secret),
        TIMESTAMP_HEADER: str(_timestamp_of(body)),
        DELIVERY_HEADER: str(payload.get("delivery_id", "")),
        EVENT_HEADER: str(payload.get("event", "")),
        "X-Renderfarm-Attempt": str(self.request.retries + 1),
    }
    status = _post(target, body, headers, settings.WEBHOOK_TIMEOUT_S)
    if 200 <= status < 300:
        log.info("webhook %s delivered to %s (HTTP %d, attempt %d)", payload.get("event"), target.host, status,
                 self.request.retries + 1)  # fmt: skip
        return {"status": status, "attempts": self.request.retries + 1}
    if status >= 500 or status in _RETRY_STATUS:
        raise WebhookFailed(f"webhook receiver {target.host} answered HTTP {status}")
    raise WebhookRejected(f"webhook receiver {target.host} refused the delivery: HTTP {status} (not retried)")


def _timestamp_of(body: bytes) -> int:
    import json

    return int(json.loads(body)["timestamp"])


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to ``address`` (already checked), with the URL's host in the Host header."""

    def __init__(self, target: Target, address: str, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to ``address`` (already checked), verifying the certificate for the URL's host."""

    def __init__(self, target: Target, address: str, timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout, context=self._tls)
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


def _post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> int:
    parts = urlsplit(target.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    errors = []
    for address in target.addresses:
        kind = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
        connection = kind(target, address, timeout)
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read(64 * 1024)
            return int(response.status)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{address}: {type(exc).__name__}: {exc}")
        finally:
            connection.close()
    raise WebhookFailed(f"webhook receiver {target.host} unreachable: {'; '.join(errors)}")
