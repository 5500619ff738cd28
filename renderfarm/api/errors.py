"""The gateway's answers when something is wrong: OpenAI's error object, and which failures mean what.

An error is ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status. A request
with several bad parameters gets one 400 naming them all: ``param`` is the first, ``message``
lists every one (``size: ...; model: ...``), and ``errors`` holds each as ``{"param", "message"}``.
Redis (the queue, the records, the quotas) unreachable, stalled or refusing writes is a 503
``queue_unavailable`` with ``Retry-After``, whichever endpoint met it.
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import BackendError
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError
from starlette.responses import JSONResponse

__all__ = ["ApiError", "UNAVAILABLE", "RETRY_AFTER_S", "quoted", "unavailable"]

# What Redis being away looks like from here: redis-py's own errors (connection refused, a timeout
# on a stalled server, a refused write when it is out of memory), kombu's when a publish fails, and
# Celery's result backend giving up.
UNAVAILABLE: tuple[type[BaseException], ...] = (RedisError, OperationalError, BackendError)
RETRY_AFTER_S = 5  # what a 503 asks the client to wait


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error", headers: dict[str, str] | None = None,
        errors: list[tuple[str, str]] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers, self.errors = headers or {}, errors

    @classmethod
    def bad_parameters(cls, problems: list[tuple[str, str]]) -> ApiError:
        """One 400 for every ``(param, message)``; each message starts with its parameter's name."""
        return cls(400, "; ".join(message for _, message in problems), param=problems[0][0], code="invalid_value",
                   errors=problems)  # fmt: skip

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        if self.errors is not None:
            error["errors"] = [{"param": param, "message": message} for param, message in self.errors]
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def unavailable() -> ApiError:
    return ApiError(503, "The render queue is unavailable; try again", code="queue_unavailable", kind="server_error",
                    headers={"retry-after": str(RETRY_AFTER_S)})  # fmt: skip


def quoted(value: str, limit: int = 40) -> str:
    """A client's value inside a message: quoted, escaped (``repr``), and cut short."""
    return repr(value if len(value) <= limit else value[:limit] + "...")
