"""What a starting worker loads: every hook of the worker process, connected to the app.

Named in the app's ``include`` (``tasks.celery``): Celery imports it when a worker starts, before
its first signal, and never in a producer. The hooks then do the rest: ``lifecycle`` validates the
settings, applies the worker's configuration and gives ``tasks.render`` its pipeline, then loads
the engine in each pool process; ``vitals`` leaves the heartbeat and model-loaded markers for the
local probes, ``queues`` subscribes to the model's queue, ``lease`` renews the leases of running tasks, ``memory`` trims
after each render, ``metrics`` and ``logs`` watch, ``s9_notify`` queues webhooks, importing
``info`` registers the ``renderfarm_info`` control command, and importing ``revoke`` makes Celery's
``revoke`` of a running render a cancel.
"""

from __future__ import annotations

from tasks.celery import app
from tasks.pipeline import s9_notify
from tasks.worker import info, lease, lifecycle, logs, memory, metrics, queues, revoke, vitals

__all__: list[str] = []

lifecycle.install(app)
queues.install(app)  # before metrics: the queue-depth metric reads the worker's queues
vitals.install(app)  # after lifecycle: a pool process is marked loaded once its engine loaded
lease.install(app)
memory.install(app)
# After lifecycle: its worker_process_init loads the engine before metrics reads the load time.
metrics.install(app)
logs.install(app)
s9_notify.install(app)
info.install(app)
revoke.install(app)
