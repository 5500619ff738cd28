"""Test-only: this worker's broker keys carry kombu's ``global_keyprefix`` (``farm-a:``), as a farm
sharing its Redis with another would set it. Loaded through ``CELERY_WORKER_INCLUDE`` (as
tests.pacing is), in the worker's main process before it connects. Never loaded by the project."""

from __future__ import annotations

from tasks.celery import app

PREFIX = "farm-a:"
app.conf.broker_transport_options = {**(app.conf.broker_transport_options or {}), "global_keyprefix": PREFIX}
