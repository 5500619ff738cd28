"""The render farm's Celery app and tasks. The modules at this level are the producer's face.

Producers: ``from tasks import render; render.delay(prompt="...")``. What a producer may import
is here, at the top level: ``celery`` (the app), ``render`` (the ``tasks.render`` declaration),
``schemas`` (request and result), ``errors``, ``profiles`` (each model's defaults), ``keys`` (the
object key of a request), ``images`` (an image-conditioned render's ``image``: ``data_url``, the
checks), ``cancel`` and ``webhook`` (signing, and verifying a delivery). They
import no torch and no worker-only module, and read only the broker's settings.

The subpackages are the worker's, in layers that import downwards only:
``worker`` (the worker process) uses ``pipeline`` (a render, stage by stage), which uses
``engines`` (FastVideo, diffusers); all of them may use the face and ``worker_config``, never the
other way round (``tests/test_imports.py`` checks it). Celery loads them in workers only.
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
from worker_config.celery_config import PRIORITIES

__all__ = [
    "app",
    "render",
    "PRIORITIES",
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
