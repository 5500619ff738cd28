"""What every request passes through first: its id, its log line, its body's deadline, its errors.

- ``x-request-id``: the client's own when it is 1 to 128 characters of ``A-Z a-z 0-9 . _ : + / = -``,
  else a fresh ``req_<hex>`` (logged: the client's was replaced, never echoed). Every response of
  the application carries it; the gateway logs one line per request with it (method, the path as
  sent, status, time).
- The body must have arrived ``API_BODY_TIMEOUT_S`` after the headers: else 408 ``request_timeout``
  with ``Connection: close``, and what was read of it is dropped with the request.
- Over the connection cap (``server.GuardedH11Protocol`` marks the request): 503 ``server_busy``
  with Retry-After and ``Connection: close``, before any route runs.
- Errors that escape the routes: a client gone before its body was read is logged without a
  traceback; Redis away (``errors.UNAVAILABLE``) is a 503 with Retry-After;
  anything else a 500 in OpenAI's shape naming the request id, logged once with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from renderfarm.api.errors import UNAVAILABLE, ApiError, unavailable

__all__ = ["RequestGuard", "new_request_id"]

log = logging.getLogger("renderfarm.api")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class BodyTimeout(Exception):
    """The request's body did not arrive in time."""


class RequestGuard:
    """ASGI middleware, inside Starlette's own error handler and outside the routes."""

    def __init__(self, app: ASGIApp, body_timeout_s: float) -> None:
        self.app, self.body_timeout_s = app, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        started, status = time.perf_counter(), 0
        app = self.app if not scope["state"].get("over_capacity") else _busy(scope["state"]["over_capacity"]).response()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        body_read = False

        async def receive_in_time() -> Message:
            nonlocal body_read
            if body_read:  # what follows the body (a disconnect) has no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout from None
            body_read = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        what = f"{scope['method']} {_path(scope)}"
        try:
            await app(scope, receive_in_time, send_with_id)
        except Exception as exc:  # every error becomes an answer here, logged once
            if status:  # the response had started: nothing more can be said to the client
                log.error("%s %s failed after its response started", rid, what, exc_info=exc)
                return
            await _answer(exc, rid, what, self.body_timeout_s).response()(scope, receive, send_with_id)
        finally:
            log.info("%s %s %d %.0fms", rid, what, status, 1000 * (time.perf_counter() - started))


def _busy(cap: int) -> ApiError:
    """Over the connection cap (``server.GuardedH11Protocol``): try again soon, on another connection."""
    headers = {"retry-after": "1", "connection": "close"}
    return ApiError(503, f"The gateway is at its limit of {cap} connections (API_MAX_CONNECTIONS); try again",
                    code="server_busy", kind="server_error", headers=headers)  # fmt: skip


def _answer(exc: Exception, rid: str, what: str, body_timeout_s: float) -> ApiError:
    if isinstance(exc, BodyTimeout):
        return ApiError(408, f"The request body did not arrive within {body_timeout_s:g} s (API_BODY_TIMEOUT_S)",
                        code="request_timeout", headers={"connection": "close"})  # fmt: skip
    if isinstance(exc, ClientDisconnect):  # nobody to answer; not the gateway's error
        log.info("%s %s: the client closed the connection before its request was read", rid, what)
        return ApiError(400, "The connection was closed before the request was read", code="client_closed")
    if isinstance(exc, UNAVAILABLE):
        log.warning("%s %s: Redis is unavailable: %s: %s", rid, what, type(exc).__name__, exc)
        return unavailable()
    log.error("%s %s failed", rid, what, exc_info=exc)
    return ApiError(500, f"The server had an error while processing your request (request id {rid})",
                    code="internal_error", kind="server_error")  # fmt: skip


def _request_id(scope: Scope) -> str:
    """The client's ``x-request-id`` when it is safe to echo and log, else a new one."""
    given = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
    if given is None:
        return new_request_id()
    text = given.decode("latin-1")
    if _SAFE_ID.fullmatch(text):
        return text
    rid = new_request_id()
    log.warning("%s replaced the client's x-request-id (%d characters; allowed: 1 to 128 of A-Z a-z 0-9 . _ : + / = -)",
                rid, len(text))  # fmt: skip
    return rid


def _path(scope: Scope) -> str:
    """The path as it was sent, any byte outside printable ASCII escaped: no control character reaches the log."""
    raw: Any = scope.get("raw_path")
    text = raw.decode("latin-1") if isinstance(raw, bytes) else scope["path"]
    return "".join(c if "!" <= c <= "~" else f"\\x{ord(c):02x}" for c in text[:2048])
