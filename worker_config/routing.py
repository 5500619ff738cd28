"""Which queue a render goes to, and which queues a worker consumes: one queue per model.

- A request for the default model (``DEFAULT_MODEL``), or without ``model``, goes to ``render``.
- A request for any other model X goes to ``render.<slug of X>``: the model id lower-cased, each
  run of characters other than ``a-z 0-9 . _ -`` replaced by ``-`` (``queue_for``; e.g.
  ``FastVideo/FastWan2.1-T2V-1.3B-Diffusers`` -> ``render.fastvideo-fastwan2.1-t2v-1.3b-diffusers``).
- A render worker consumes its own model's queue, always (a producer that does not know the farm's
  ``DEFAULT_MODEL`` and names the model still reaches it); also ``render`` when it serves the
  default model, or when no ``DEFAULT_MODEL`` is set (a single-model farm: ``render`` as before).
  ``is_render_queue`` tells a render queue from any other (``webhooks``); which workers are render
  workers is decided as a worker starts (``tasks/worker/queues.py``).

Producers that import this project get this from a Celery router (``RenderRouter`` in
``app_config``): ``render.delay(model=X)`` lands on X's queue with nothing else configured. A
producer that does not import it passes ``queue=queue_for(X, DEFAULT_MODEL)`` (docs/api.md).
A request for a model that no worker serves waits in its queue until a worker for it starts
(or KEDA starts one): ``renderfarm models`` shows such a queue with its waiting requests.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["RENDER_QUEUE", "RENDER_TASK", "RenderRouter", "is_render_queue", "queue_for", "worker_queues"]

RENDER_QUEUE = "render"
RENDER_TASK = "tasks.render"
_OTHER = re.compile(r"[^a-z0-9._-]+")


def queue_for(model: str | None, default_model: str | None) -> str:
    """The queue a request for ``model`` (None: the default model) goes to."""
    if model is None or model == default_model:
        return RENDER_QUEUE
    slug = _OTHER.sub("-", model.lower()).strip("-.")
    if not slug:
        raise ValueError(f"model {model!r} has no letter or digit to name its queue by")
    return f"{RENDER_QUEUE}.{slug}"


def is_render_queue(name: str) -> bool:
    """``render`` or ``render.<model>``: a queue that carries ``tasks.render`` (and only render workers consume)."""
    return name == RENDER_QUEUE or name.startswith(f"{RENDER_QUEUE}.")


def worker_queues(model_id: str, default_model: str | None) -> list[str]:
    """The render queues a worker serving ``model_id`` consumes, ``render`` first where it is one."""
    own = queue_for(model_id, None)
    if default_model is None or model_id == default_model:
        return [RENDER_QUEUE, own]
    return [own]


class RenderRouter:
    """A Celery router (``task_routes``): ``tasks.render`` to its model's queue."""

    def __init__(self, default_model: str | None) -> None:
        self.default_model = default_model

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> Any:
        if name != RENDER_TASK:
            return None
        model = kwargs.get("model") if isinstance(kwargs, dict) else None
        try:
            return {"queue": queue_for(model if isinstance(model, str) else None, self.default_model)}
        except ValueError:
            return {"queue": RENDER_QUEUE}  # the worker rejects it with the field named

    def __repr__(self) -> str:
        return f"RenderRouter(default_model={self.default_model!r})"
