"""The gateway's HTTP server: uvicorn (h11), with what uvicorn does not do against slow clients.

uvicorn already bounds a request's headers (h11: 16 KiB, else 400), closes idle keep-alive
connections (5 s) and stops gracefully (in-flight requests get ``SHUTDOWN_GRACE_S``). It has no
deadline for a request's headers (uvicorn issue 157: a connection that sends half its headers
stays open for ever) and its own connection cap (``limit_concurrency``) answers a plain-text 503.
``GuardedH11Protocol`` adds both, per connection:

- headers deadline: from the connection's start, or from the first byte of a later request on a
  kept-alive one, its request's headers must be complete within ``API_HEADER_TIMEOUT_S``; else a
  408 ``request_timeout`` (with an ``x-request-id``) and the connection is closed;
- a cap: while more than ``API_MAX_CONNECTIONS`` connections are open, a request is answered 503
  ``server_busy`` with Retry-After and ``Connection: close`` by ``RequestGuard``'s side of it
  (``scope["state"]["over_capacity"]``), with its request id and log line.

The body's deadline is the application's (``guard.RequestGuard``): it can answer an OpenAI error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from renderfarm.api.errors import ApiError
from renderfarm.api.guard import new_request_id
from renderfarm.api.settings import ApiSettings

__all__ = ["GuardedH11Protocol", "serve", "SHUTDOWN_GRACE_S"]

log = logging.getLogger("renderfarm.api")
SHUTDOWN_GRACE_S = 20  # in-flight requests finish within this after SIGTERM (Kubernetes waits 30 s by default)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers and a connection cap."""

    header_timeout_s = 10.0
    max_connections = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        application = self.app

        async def capped(scope: Any, receive: Any, send: Any) -> None:
            if len(self.connections) > self.max_connections:
                scope.setdefault("state", {})["over_capacity"] = self.max_connections
            await application(scope, receive, send)

        self.app = capped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # a request's head begins (or goes on)
            self._arm()
        super().data_received(data)
        self._disarm_once_read()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # a pipelined head, partly here
            self._arm()
        self._disarm_once_read()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _disarm_once_read(self) -> None:
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        rid = new_request_id()
        error = ApiError(408, f"The request's headers did not arrive within {self.header_timeout_s:g} s "
                         "(API_HEADER_TIMEOUT_S)", code="request_timeout")  # fmt: skip
        body = json.dumps(error.body()).encode()
        head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                f"connection: close\r\nx-request-id: {rid}\r\n\r\n")  # fmt: skip
        self.transport.write(head.encode() + body)
        self.transport.close()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.info("%s - - 408 the headers from %s took over %gs", rid, client, self.header_timeout_s)


def guarded_protocol(settings: ApiSettings) -> type[GuardedH11Protocol]:
    """``GuardedH11Protocol`` with this deployment's header deadline and connection cap."""
    limits = {"header_timeout_s": settings.API_HEADER_TIMEOUT_S, "max_connections": settings.API_MAX_CONNECTIONS}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), limits)


def serve(application: Any, settings: ApiSettings, host: str, port: int) -> None:
    """Serve the videos API (``app.create_app``) until SIGINT or SIGTERM."""
    import uvicorn

    config = uvicorn.Config(
        application, host=host, port=port, http=guarded_protocol(settings), ws="none",
        log_level="info", access_log=False,  # the gateway's own line per request (guard.RequestGuard)
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )  # fmt: skip
    uvicorn.Server(config).run()
