"""``renderfarm_info``: a remote-control command a worker answers with what it serves.

``app.control.broadcast("renderfarm_info", reply=True)`` returns, per worker, whether it is a
render worker (``renders``, ``tasks.worker.queues``), the model (``MODEL_ID``) and the engine it
is configured for (``null`` in a worker that is not a render worker), its queues, worker mode and
metrics port.
``renderfarm workers`` shows it beside Celery's own ``active`` and ``stats``.
"""

from __future__ import annotations

import os
from typing import Any

from celery.worker.control import control_command

__all__ = ["install", "renderfarm_info"]


@control_command()
def renderfarm_info(state: Any, **_: Any) -> dict[str, Any]:
    """What this worker serves: model, engine, queues, mode, metrics port."""
    from tasks.engines import choose_engine
    from tasks.worker.queues import serves_renders
    from worker_config.settings import get_settings

    settings = get_settings()
    try:
        queues = sorted(q.name for q in state.consumer.task_consumer.queues)
    except AttributeError:
        queues = []
    renders = serves_renders()
    return {
        "renders": renders,
        "model": settings.MODEL_ID if renders else None,
        "engine": choose_engine(settings) if renders else None,
        "queues": queues,
        "worker_mode": settings.WORKER_MODE,
        "metrics_port": settings.METRICS_PORT or None,
        "cuda_visible_devices": settings.CUDA_VISIBLE_DEVICES,
        "pid": os.getpid(),
    }


def install(app: Any) -> None:
    """Nothing to connect: importing this module registers the command (in the worker that imports tasks)."""
