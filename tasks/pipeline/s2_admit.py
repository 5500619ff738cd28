"""Stage 2, admission: one Redis round trip per delivery. Was the task cancelled while it waited
(``tasks.cancel``)? Has its worker died during too many of its deliveries (``MAX_DELIVERIES``)?"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from celery import Task
from celery.utils.log import get_task_logger

from tasks.cancel import CANCEL_KEY
from tasks.errors import DeliveryLimitExceeded
from tasks.pipeline.cancelling import RenderCancelled
from worker_config.settings import get_settings

__all__ = ["delivery"]

log = get_task_logger("tasks.render")


@contextmanager
def delivery(task: Task) -> Iterator[None]:
    """Count this delivery while it runs (see ``_admit``). A delivery that returns or raises an
    ordinary exception in this process is not one its worker died in: its count is cleared, so
    only deaths add up and a producer may send the same request again under the same task id.
    ``SystemExit``/``KeyboardInterrupt`` (billiard turns SIGQUIT/SIGTERM into SystemExit, and
    FastVideo's worker sends SIGQUIT when it fails) mean the process is dying: the count stays."""
    name = _admit(task)
    try:
        yield
    except Exception:
        _clear_delivery(task, name)
        raise
    _clear_delivery(task, name)


def _clear_delivery(task: Task, name: str) -> None:
    try:
        task.backend.client.delete(name)
    except Exception as exc:  # noqa: BLE001 - the count expires on its own; never mask the outcome
        log.debug("could not clear the delivery count %s: %s", name, exc)


def _admit(task: Task) -> str:
    """One round trip: stop if the task was cancelled; count this delivery and fail for good once
    its worker died during too many of them. Returns the counter's key."""
    settings = get_settings()
    limit = settings.MAX_DELIVERIES
    name = f"renderfarm:deliveries:{task.request.id}:{task.request.retries}"
    ttl = (settings.RENDER_TIME_LIMIT_S + settings.VISIBILITY_TIMEOUT_S) * (limit + 1)
    pipe = task.backend.client.pipeline(transaction=False)
    pipe.exists(CANCEL_KEY.format(task_id=task.request.id)).incr(name).expire(name, ttl)
    cancelled, count, _ = pipe.execute()
    if cancelled:
        raise RenderCancelled
    if count > limit:
        raise DeliveryLimitExceeded(
            f"task {task.request.id} was delivered {count} times and its worker process died during each of "
            f"the previous {count - 1} (crash, out-of-memory kill or lost node); giving up after "
            f"MAX_DELIVERIES={limit}. Check the worker logs for the cause."
        )
    return name
