"""The error hierarchy: what went wrong, and so what happens next.

- ``InvalidRequest``: the request can never succeed; rejected before any model work, never retried.
- ``TransientError``: worth trying again; the task declares retry with backoff and a cap.
- ``FatalWorkerError``: the process cannot serve (model failed to load, engine unusable); the
  worker exits with a diagnosis instead of taking tasks.
- ``DeliveryLimitExceeded``: a task killed its worker on every delivery; failed for good.

Each carries a plain message that names the problem and, where known, the fix. They are built
from a single string so Celery can carry them through the JSON result backend.
"""

from __future__ import annotations

__all__ = [
    "RenderError",
    "InvalidRequest",
    "TransientError",
    "StorageUnavailable",
    "FatalWorkerError",
    "EngineNotReady",
    "DeliveryLimitExceeded",
    "RenderTimeout",
    "RenderOutOfMemory",
    "EngineWorkerLost",
]


class RenderError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidRequest(RenderError):
    """The request is malformed or out of bounds. Never retried; costs no model time."""


class TransientError(RenderError):
    """A temporary failure (storage, network, transient out-of-memory); retried with backoff."""


class StorageUnavailable(TransientError):
    """Object storage could not be reached or refused the operation."""


class FatalWorkerError(RenderError):
    """This process cannot serve renders; it must exit rather than take tasks."""


class EngineNotReady(FatalWorkerError):
    """The engine was used before it finished loading, or after it was released."""


class DeliveryLimitExceeded(RenderError):
    """The task was delivered too many times: its worker died on each attempt."""


class RenderTimeout(RenderError):
    """The render ran past its soft time limit and was stopped."""


class RenderOutOfMemory(RenderError):
    """The render ran out of memory twice (after freeing memory once); the message names its size."""


class EngineWorkerLost(RenderError):
    """The engine's own worker process died during the render twice in a row (it was rebuilt after each)."""
