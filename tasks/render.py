"""``tasks.render`` as producers see it: its name, its arguments, its retry policy, its errors.

Retry is declared here (transient errors: backoff with a cap); invalid requests, timeouts,
cancellations and the delivery cap are final. The body is the render pipeline
(``tasks.pipeline``), which exists only in workers: when a worker starts, ``tasks.worker.lifecycle``
(connected by ``tasks.worker.boot``, which Celery imports in workers only through the app's
``include``) hands it over with ``use_pipeline`` at ``celeryd_init``, with ``STORAGE_MAX_RETRIES``.
A producer importing this module imports no pipeline, engine or worker module and reads no worker
setting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task

from tasks.celery import app
from tasks.errors import (
    DeliveryLimitExceeded,
    EngineNotReady,
    EngineWorkerLost,
    InvalidRequest,
    RenderOutOfMemory,
    RenderTimeout,
    TransientError,
)
from tasks.webhook import RedactingTask

__all__ = ["render", "use_pipeline", "Pipeline"]

# The body: pipeline(task, positional args, keyword args) -> the result object.
Pipeline = Callable[[Task, tuple[Any, ...], dict[str, Any]], dict[str, Any]]
_pipeline: Pipeline | None = None


@app.task(
    bind=True,
    base=RedactingTask,  # a webhook_url's query (a token?) never shows in events or logs
    name="tasks.render",
    autoretry_for=(TransientError,),
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
    throws=(InvalidRequest, DeliveryLimitExceeded, RenderTimeout, RenderOutOfMemory, EngineWorkerLost),
)
def render(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Render a video from a text prompt; return where the MP4 is (see ``RenderResult``)."""
    if _pipeline is None:
        raise EngineNotReady(
            "tasks.render runs only in a render worker (celery -A tasks worker ...), which loads the pipeline "
            "and the model when it starts; send it with render.delay(...) instead of calling it here"
        )
    return _pipeline(self, args, kwargs)


def use_pipeline(pipeline: Pipeline, max_retries: int) -> None:
    """Give ``tasks.render`` its body and retry cap (``STORAGE_MAX_RETRIES``): in a worker, at start."""
    global _pipeline
    _pipeline = pipeline
    render.max_retries = max_retries
