"""The Celery app. Built here and nowhere else; tasks are declared in their own modules.

Configured with what every process that talks to the farm needs (``app_config``: the broker,
queues, priorities, serialization), read from the broker's settings only: importing the app
reads no worker setting. A worker gets the rest when it starts:

- ``celery worker`` reads the worker's settings and applies its configuration (``celery_config``:
  time limits, prefetch, leases, process lifecycle) before it reads any of its own options (an
  eager option of the worker command, ``app.user_options``: Celery takes ``--concurrency`` and
  ``--prefetch-multiplier`` defaults from the configuration at that point). Invalid settings stop
  it there, with the variable named (exit code 2).
- Celery imports the modules named in ``include`` in worker processes only (never in a
  producer): ``tasks.worker.boot`` connects the worker's hooks and gives ``tasks.render`` its
  body, the pipeline.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from celery import Celery

from worker_config.celery_config import app_config, celery_config
from worker_config.settings import SettingsError, get_broker_settings, get_settings

__all__ = ["app"]

app = Celery("tasks", include=["tasks.worker.boot"])
app.conf.update(app_config(get_broker_settings()))


def _configure_worker(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"renderfarm worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    app.conf.update(celery_config(settings))


app.user_options["worker"].add(
    click.Option(
        ["--renderfarm-settings"], is_flag=True, is_eager=True, expose_value=False, hidden=True,
        callback=_configure_worker, help="(internal) apply the worker's settings before its options are read",
    )
)  # fmt: skip
