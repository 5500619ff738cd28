"""The Celery app. Built here and nowhere else; tasks live in their own modules."""

from __future__ import annotations

from celery import Celery

from worker_config import lease, lifecycle
from worker_config.celery_config import celery_config
from worker_config.settings import get_settings

__all__ = ["app"]

app = Celery("tasks", include=["tasks.render"])
app.conf.update(celery_config(get_settings()))
lifecycle.install(app)
lease.install(app)
