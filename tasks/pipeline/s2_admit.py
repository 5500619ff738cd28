"""Stage 2, admission: one Redis round trip per delivery. Was the task cancelled while it waited
(``tasks.cancel``)? Has its worker died during too many of its deliveries (``MAX_DELIVERIES``)?
Has another worker finished it already? A delivery of a task that succeeded elsewhere (the late
retry of a worker that was cut off, a copy sent again under the same task id) is dropped before
any model work; a copy that was already rendering (a paused or cut-off node's) is dropped after
its upload, and one admitted just before the other copy succeeded is dropped when it finds that
copy's video in storage (``drop_if_succeeded``): the stored result stands, no second ``SUCCESS``
is reported.

If Redis cannot be reached here the render goes on, uncounted and unchecked, and says so: a render
does not need Redis, its cancel flag is watched again while it denoises, and a count missed in an
outage only lets a crashing task run once more."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore
from celery.utils.log import get_task_logger

from tasks.cancel import CANCEL_KEY
from tasks.errors import DeliveryLimitExceeded
from tasks.pipeline.cancelling import RenderCancelled
from worker_config.settings import get_settings

__all__ = ["delivery", "drop_if_succeeded"]

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
    """One round trip: stop if the task was cancelled or has succeeded already; count this delivery
    and fail for good once its worker died during too many of them. Returns the counter's key."""
    settings = get_settings()
    limit = settings.MAX_DELIVERIES
    name = f"renderfarm:deliveries:{task.request.id}:{task.request.retries}"
    ttl = (settings.RENDER_TIME_LIMIT_S + settings.VISIBILITY_TIMEOUT_S) * (limit + 1)
    pipe = task.backend.client.pipeline(transaction=False)
    pipe.exists(CANCEL_KEY.format(task_id=task.request.id)).incr(name).expire(name, ttl)
    pipe.get(task.backend.get_key_for_task(task.request.id))
    try:
        cancelled, count, _, meta = pipe.execute()
    except task.backend.connection_errors as exc:
        log.warning("Redis unreachable at admission (%s: %s): rendering on, this delivery uncounted",
                    type(exc).__name__, exc)  # fmt: skip
        return name
    if cancelled:
        raise RenderCancelled
    if (stored := _succeeded(task, meta)) is not None:
        _clear_delivery(task, name)
        _drop(task, stored, "at admission")
    if count > limit:
        raise DeliveryLimitExceeded(
            f"task {task.request.id} was delivered {count} times and its worker process died during each of "
            f"the previous {count - 1} (crash, out-of-memory kill or lost node); giving up after "
            f"MAX_DELIVERIES={limit}. Check the worker logs for the cause."
        )
    return name


def drop_if_succeeded(task: Task) -> None:
    """Raise ``Ignore`` if the task succeeded elsewhere while this copy ran (a paused or cut-off
    node's late copy, whose video is the same object): its result is not reported a second time.
    Goes on when Redis cannot say."""
    try:
        meta = task.backend.client.get(task.backend.get_key_for_task(task.request.id))
    except task.backend.connection_errors:
        return
    if (stored := _succeeded(task, meta)) is not None:
        _drop(task, stored, "after its upload")


def _succeeded(task: Task, meta: bytes | None) -> dict[str, Any] | None:
    """The task's stored state, decoded, if it is ``SUCCESS``; None otherwise."""
    stored = task.backend.decode_result(meta) if meta else None
    return stored if stored is not None and stored.get("status") == states.SUCCESS else None


def _drop(task: Task, stored: dict[str, Any], when: str) -> None:
    worker = (stored.get("result") or {}).get("worker", "another worker")
    log.warning("task %s already succeeded on %s: this copy is dropped %s, its result stands",
                task.request.id, worker, when)  # fmt: skip
    raise Ignore()
