"""Worker log lines that carry the task id: ``LOG_FORMAT=text`` (default) or ``json``.

A log record factory stamps every record, from any logger (ours, Celery's, diffusers',
redirected ``print``), with ``task_id`` and ``task_name`` of the task running in that process
when it was made (Celery's current task); records about a task made outside it (the main
process's "received" line) take the id from their arguments. When Celery has set up the worker's
logging (``after_setup_logger``, ``after_setup_task_logger``), every handler gets our formatter:

- text: ``[time: LEVEL/process] [task-id] logger: message`` (the bracket only while a task runs);
- json: one object a line with ``time``, ``level``, ``logger``, ``process``, ``pid``, ``task_id``,
  ``task_name``, ``message`` (and ``exc_info``), for log pipelines (Loki, CloudWatch, ...).

Celery's start-up banner is printed, not logged, and stays plain text.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from celery import signals

from worker_config.settings import get_settings

__all__ = ["INTERNALS", "install", "JsonFormatter", "TEXT_FORMAT", "task_of"]

# Celery's internals this relies on (checked by tests/test_internals.py against the pinned versions).
INTERNALS = ("celery._state.get_current_task",)  # the task a log record belongs to, as TaskFormatter reads it

TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(task_tag)s%(name)s: %(message)s"
_installed_factory = False


def task_of(record: logging.LogRecord) -> tuple[str | None, str | None]:
    """(task id, task name) for a record: the running task, else ids named in its arguments."""
    from celery._state import get_current_task  # what Celery's own TaskFormatter reads

    task = get_current_task()
    request = getattr(task, "request", None) if task is not None else None
    task_id = getattr(request, "id", None)
    if task_id:
        return str(task_id), getattr(task, "name", None)
    args = record.args
    if isinstance(args, dict) and isinstance(args.get("id"), str):
        return args["id"], args.get("name") if isinstance(args.get("name"), str) else None
    return None, None


def _install_record_factory() -> None:
    global _installed_factory
    if _installed_factory:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            task_id, task_name = task_of(record)
        except Exception:  # noqa: BLE001 - logging must never fail
            task_id, task_name = None, None
        record.task_id = task_id
        record.task_name = task_name
        record.task_tag = f"[{task_id}] " if task_id else ""
        return record

    logging.setLogRecordFactory(factory)
    _installed_factory = True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "task_id": getattr(record, "task_id", None),
            "task_name": getattr(record, "task_name", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _formatter(colorize: bool) -> logging.Formatter:
    if get_settings().LOG_FORMAT == "json":
        return JsonFormatter()
    from celery.utils.log import ColorFormatter

    return ColorFormatter(TEXT_FORMAT, use_color=bool(colorize))


def _apply(logger: logging.Logger | None = None, colorize: bool | None = False, **_: Any) -> None:
    _install_record_factory()
    if logger is None:
        return
    for handler in logger.handlers:
        handler.setFormatter(_formatter(bool(colorize)))


def install(app: Any) -> None:
    """Format the worker's logs once Celery has set them up (nothing changes in producers)."""
    signals.after_setup_logger.connect(_apply, weak=False)
    signals.after_setup_task_logger.connect(_apply, weak=False)
