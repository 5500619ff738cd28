"""Celery's ``revoke`` of a render this worker is running: a cancel, as ``renderfarm cancel`` asks it.

Celery's own ``revoke`` remote-control command only marks an id revoked in the worker's main
process: a message not yet started is then discarded, but a running task goes on, since the pool
process never hears of it (and ``terminate`` kills the pool process, and with it the loaded model).
So Flower's "Revoke" button, ``AsyncResult(id).revoke()`` and ``celery control revoke`` left a
running render to finish, be stored and end ``SUCCESS``. Here the command is Celery's, with one step
before it: for each render the worker is running it raises the render's cancel flag
(``tasks.cancel.raise_flag``), which the render watches (``tasks.pipeline.cancelling``), so it stops
at its next denoising step or stage boundary, ends ``REVOKED`` saying where, and the pool process
keeps its model. ``terminate`` is left as Celery does it: the pool process is killed (a stuck
render's last resort; the model loads again).

Registered under Celery's name with Celery's decorator (``control_command``), replacing Celery's entry
in the worker process that imports it (``tasks.worker.boot``); ``tasks.cancel.request_cancel`` raises
the flag itself before its own revoke, so a second flag is harmless.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.utils.functional import maybe_list
from celery.worker import control as celery_control
from celery.worker import state as worker_state
from celery.worker.control import control_command

from tasks.cancel import raise_flag
from worker_config.routing import RENDER_TASK

__all__ = ["INTERNALS", "install", "revoke"]

log = logging.getLogger("renderfarm.cancel")

INTERNALS = (
    "celery.worker.control.revoke",  # Celery's command, run after the flag is raised
    "celery.worker.state.active_requests",  # the requests this worker is running
    "celery.worker.control.Panel.meta",  # the command's arguments, copied from Celery's entry
)
_CELERY_REVOKE = celery_control.revoke
_META = celery_control.Panel.meta["revoke"]


@control_command(variadic=_META.variadic, signature=_META.signature, args=_META.args)
def revoke(state: Any, task_id: Any, terminate: bool = False, signal: str | None = None, **kwargs: Any) -> Any:
    """Revoke task by task id (or list of ids); a render running here is cancelled at its next step."""
    ids = set(maybe_list(task_id) or [])
    running = sorted(r.id for r in worker_state.active_requests if r.id in ids and r.task_name == RENDER_TASK)
    if running and not terminate:
        for render_id in running:
            try:
                raise_flag(state.app, render_id)
            except Exception as exc:  # noqa: BLE001 - Celery's revoke still runs
                log.error("could not cancel render %s on its revoke: %s: %s", render_id, type(exc).__name__, exc)
            else:
                log.info("render %s revoked while it runs: cancelled, it stops at its next step", render_id)
    return _CELERY_REVOKE(state, task_id, terminate=terminate, signal=signal, **kwargs)


def install(app: Any) -> None:
    """Nothing to connect: importing this module registers the command (in the worker that imports tasks)."""
