"""The Celery app. Built here and nowhere else; tasks live in their own modules."""

from __future__ import annotations

from celery import Celery

from worker_config import info, lease, lifecycle, logs, metrics, webhooks
from worker_config.celery_config import celery_config
from worker_config.settings import get_settings

__all__ = ["app"]

app = Celery("tasks", include=["tasks.render", "tasks.notify"])
app.conf.update(celery_config(get_settings()))
lifecycle.install(app)
lease.install(app)
# After lifecycle: its worker_process_init loads the engine before metrics reads the load time.
metrics.install(app)
logs.install(app)
webhooks.install(app)
info.install(app)
