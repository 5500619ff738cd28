"""A render that reached a process with no engine: given back to its queue, never failed.

Only render workers consume render queues (``tasks.worker.queues``), and their pool processes load
the engine before they take a task. A render can still reach a process without one: a render queue
added to another worker at run time (Flower's "add consumer", ``celery control add_consumer``).
Failing it there would lose a render any render worker could have done, so ``give_back``, the
first thing ``tasks.render`` does in such a process:

- logs an error naming the worker, the queue and the fix;
- removes the ``STARTED`` state Celery wrote for it (the render is waiting again: ``PENDING``);
- sends ``render_given_back`` (the worker counts it in ``renderfarm_renders_requeued_total`` and
  stops consuming its render queues, so it cannot take the render again);
- raises ``Reject(requeue=True)``: with ``acks_late`` on Redis the same message goes back to its
  queue (to the back of its priority list), no result is written, no retry is used up, the
  delivery count (``MAX_DELIVERIES``) is not touched.

It cannot loop hot: the worker stops consuming render queues at the first one, and should that
fail, the same render returning to the same process waits before it is given back again, twice
as long each time (1 s, 2 s, ... at most ``MAX_WAIT_S``). Without any render worker the render
waits in its queue, like a render for a model no worker serves.
"""

from __future__ import annotations

import os
import time
from typing import NoReturn

from celery import Task
from celery.exceptions import Reject
from celery.utils.log import get_task_logger

from tasks.pipeline.events import render_given_back

__all__ = ["MAX_WAIT_S", "give_back", "wait_before_giving_back"]

log = get_task_logger("tasks.render")
MAX_WAIT_S = 30.0
_GIVEN_BACK: dict[str, int] = {}  # task id -> times this process gave it back
_REMEMBERED = 1000


def wait_before_giving_back(task_id: str) -> float:
    """Seconds to wait before giving ``task_id`` back (0 the first time in this process); counts it."""
    times = _GIVEN_BACK.pop(task_id, 0) + 1
    _GIVEN_BACK[task_id] = times  # most recent last
    while len(_GIVEN_BACK) > _REMEMBERED:
        del _GIVEN_BACK[next(iter(_GIVEN_BACK))]
    return 0.0 if times == 1 else min(MAX_WAIT_S, 2.0 ** (times - 2))


def give_back(task: Task) -> NoReturn:
    """Return the render ``task`` to its queue untouched (``Reject(requeue=True)``); see the module."""
    request = task.request
    queue = (request.delivery_info or {}).get("routing_key") or "?"
    worker = request.hostname or "?"
    log.error(
        "render %s reached %s (pid %d) from queue %r, but no engine is loaded in this process: it is not a "
        "render worker. Given back to the queue, untouched; this worker stops consuming render queues. Fix: "
        "consume render queues only in render workers (celery -A tasks worker --pool=prefork --concurrency=1 "
        "-Q render); give other workers only their own queues (-Q webhooks).",
        request.id, worker, os.getpid(), queue,
    )  # fmt: skip
    if request.id:
        task.backend.forget(request.id)  # the STARTED Celery wrote: it waits again
    render_given_back.send(sender=task, queue=queue, reason="no_engine")
    if request.id and (wait := wait_before_giving_back(request.id)) > 0:
        log.error("render %s came back to this process again: waiting %.0f s before giving it back", request.id,
                  wait)  # fmt: skip
        time.sleep(wait)
    raise Reject(f"no engine in {worker} (pid {os.getpid()}): given back to {queue}", requeue=True)
