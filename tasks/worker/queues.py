"""The queues a worker consumes: its model's (worker_config/routing.py), set as it starts.

Connected to ``worker_init``, after Celery applied ``-Q`` (the image and ``renderfarm worker``
pass ``-Q render``) and before anything reads the queue list (metrics, the banner): the worker
adds its model's queue, and leaves ``render`` to the default model's workers when
``DEFAULT_MODEL`` names another model. Queues given with ``-Q`` for other work (a webhook queue)
stay.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from worker_config.routing import RENDER_QUEUE, worker_queues
from worker_config.settings import get_settings

__all__ = ["install", "select_model_queues"]


def select_model_queues(sender: Any = None, **_: Any) -> None:
    """``worker_init``: ``sender`` is the WorkController."""
    settings = get_settings()
    wanted = worker_queues(settings.MODEL_ID, settings.DEFAULT_MODEL)
    queues = sender.app.amqp.queues
    for name in wanted:
        queues.select_add(name)
    if RENDER_QUEUE not in wanted:
        queues.deselect([RENDER_QUEUE])  # Celery's banner, printed next, lists what is consumed


def install(app: Any) -> None:
    signals.worker_init.connect(select_model_queues, weak=False)
