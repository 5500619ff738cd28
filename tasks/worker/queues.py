"""Which queues a worker consumes, decided as it starts: render queues only in a render worker.

**A render worker** is a worker of this app whose queues, as Celery set them from ``-Q`` (without
``-Q``: Celery's default queue, ``render``), include a render queue (``render`` or
``render.<model>``, ``worker_config.routing.is_render_queue``). ``celery -A tasks worker
--pool=prefork --concurrency=1 -Q render``, the image's command and ``renderfarm worker`` start
one. It consumes exactly its model's render queues (``worker_queues``: its own
``render.<model>``, and ``render`` when it serves ``DEFAULT_MODEL`` or none is set), whichever render
queues ``-Q`` named, plus the other queues ``-Q`` named (a webhook queue). Its pool must run the
engine: prefork or solo, the pools whose processes load it (``worker_process_init``); a render
worker on any other pool (threads, gevent, eventlet) refuses to start (exit code 2).

**Any other worker** (``celery -A tasks worker -Q webhooks --pool=threads ...``) consumes exactly
the queues ``-Q`` named and loads no engine.

Connected to ``worker_init``, after Celery applied ``-Q`` and before anything reads the queue list
(metrics, the banner). ``serves_renders()`` tells the rest of the worker which kind it is. When a
render reaches a process of this worker that has no engine anyway (a render queue added at run
time, e.g. with Flower's "add consumer"), the pipeline gives it back (``tasks.pipeline.stray``) and
this worker stops consuming its render queues (``stop_render_consumers``), so it cannot take it again.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import signals
from celery.concurrency import ALIASES, get_implementation

from tasks.pipeline.events import render_given_back
from worker_config.routing import RENDER_QUEUE, is_render_queue, worker_queues
from worker_config.settings import get_settings

__all__ = ["ENGINE_POOLS", "install", "select_queues", "serves_renders", "stop_render_consumers"]

log = logging.getLogger("renderfarm.worker")
ENGINE_POOLS = ("prefork", "solo")  # the pools whose processes run worker_process_init, where the engine loads
EX_CONFIG = 2
_RENDERS: bool | None = None  # decided at worker_init, inherited by the pool processes


def serves_renders() -> bool:
    """Is this process part of a render worker? (True where no worker decided it: the old behaviour.)"""
    return _RENDERS is not False


def _pool_name(pool: Any) -> str:
    """The ``--pool`` name of a pool class (or name), without importing the other pools (eventlet, gevent)."""
    implementation = get_implementation(pool)
    path = f"{implementation.__module__}:{implementation.__name__}"
    return next((alias for alias, where in ALIASES.items() if where == path), path)


def select_queues(sender: Any = None, **_: Any) -> None:
    """``worker_init``: ``sender`` is the WorkController; its queues are Celery's from ``-Q``.

    Celery logs and ignores an exception in a signal handler: here one stops the worker instead, as
    a worker left on Celery's queues could take renders it cannot run.
    """
    try:
        _select_queues(sender)
    except Exception as exc:  # any failure here is fatal, loudly
        print(f"renderfarm worker: FATAL: cannot choose its queues: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)  # fmt: skip
        raise SystemExit(1) from exc


def _select_queues(sender: Any) -> None:
    global _RENDERS
    queues = sender.app.amqp.queues
    named = list(queues.consume_from)  # -Q, or without it the default queue `render`
    _RENDERS = any(is_render_queue(name) for name in named)
    if not _RENDERS:
        return  # exactly what -Q named: no render queue, no engine
    pool = _pool_name(sender.pool_cls)
    if pool not in ENGINE_POOLS:
        print(
            f"renderfarm worker: FATAL: a --pool={pool} worker cannot render: only prefork and solo pool processes "
            f"load the engine, but its queues include {', '.join(q for q in named if is_render_queue(q))}. "
            "A render worker: celery -A tasks worker --pool=prefork --concurrency=1 -Q render; a worker for other "
            "work names only its own queues, e.g. -Q webhooks (docs/monitoring.md).",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EX_CONFIG)
    settings = get_settings()
    wanted = worker_queues(settings.MODEL_ID, settings.DEFAULT_MODEL)
    for name in wanted:
        queues.select_add(name)
    others = [name for name in queues.consume_from if is_render_queue(name) and name not in wanted]
    if others:  # Celery's banner, printed next, lists what is consumed
        queues.deselect(others)
        if others != [RENDER_QUEUE]:  # `-Q render` on a worker of another model is the documented command
            print(f"renderfarm worker: not consuming {', '.join(others)}: MODEL_ID={settings.MODEL_ID} consumes "
                  f"{', '.join(wanted)} (docs/api.md#models-and-queues)", file=sys.stderr, flush=True)  # fmt: skip


def stop_render_consumers(sender: Any = None, queue: str | None = None, **_: Any) -> None:
    """A render reached a process of this worker with no engine: stop taking render queues.

    A control message to this worker itself, so its consumer does it from its own loop (the task may
    run in a pool thread or child): the queue the render came from, and every render queue this
    process knows the worker consumes (a queue it does not consume is left as it is).
    """
    task = sender
    hostname = getattr(task.request, "hostname", None)
    if not hostname:
        return
    names = sorted({q for q in [queue or "", *task.app.amqp.queues.consume_from] if is_render_queue(q)})
    try:
        for name in names:
            task.app.control.cancel_consumer(name, destination=[hostname], reply=False)
    except Exception as exc:  # noqa: BLE001 - the render is given back all the same
        log.error("could not stop %s consuming render queues: %s: %s", hostname, type(exc).__name__, exc)
        return
    log.error("%s stops consuming %s: it has no engine, it cannot render", hostname, ", ".join(names))


def install(app: Any) -> None:
    signals.worker_init.connect(select_queues, weak=False)
    render_given_back.connect(stop_render_consumers, weak=False)
