"""The render farm's Celery app and tasks.

Producers: ``from tasks import render; render.delay(prompt="...")``. Importing this package
does not import torch; engines load only inside worker processes.
"""

from tasks.celery import app
from tasks.errors import (
    DeliveryLimitExceeded,
    FatalWorkerError,
    InvalidRequest,
    RenderError,
    RenderOutOfMemory,
    RenderTimeout,
    StorageUnavailable,
    TransientError,
)
from tasks.render import render
from tasks.schemas import RenderRequest, RenderResult

__all__ = [
    "app",
    "render",
    "RenderRequest",
    "RenderResult",
    "RenderError",
    "InvalidRequest",
    "TransientError",
    "StorageUnavailable",
    "FatalWorkerError",
    "DeliveryLimitExceeded",
    "RenderTimeout",
    "RenderOutOfMemory",
]
