"""Celery configuration for long GPU jobs, derived from settings.

Why each value (see docs/settings.md for the operator's view):
- JSON only: no pickle on the wire or in results; other content types are refused.
- acks_late + reject_on_worker_lost + prefetch 1: a task is acknowledged only after it finished,
  so a worker that dies gives its task back, and no worker hoards work it cannot start.
- a short visibility timeout with a lease renewed while the task runs (worker_config/lease.py):
  a healthy render is never handed to a second worker, a dead node's task moves on in minutes.
- worker_proc_alive_timeout above the model load: Celery's 4 s default SIGKILLs every
  replacement child that loads a model, in a loop.
- message priorities (high 0, normal 3, low 9) on kombu's default Redis priority lists, so a
  busy farm takes high before normal before low, from any producer (docs/api.md#priority).
"""

from __future__ import annotations

from typing import Any

from worker_config.settings import Settings

__all__ = ["RENDER_QUEUE", "PRIORITIES", "PRIORITY_STEPS", "PRIORITY_SEP", "celery_config"]

RENDER_QUEUE = "render"
# Message priorities on the Redis transport: 0 is served first, 9 last (kombu's steps 0, 3, 6, 9;
# a priority between two steps counts as the lower step number, e.g. 5 as 3).
PRIORITIES = {"high": 0, "normal": 3, "low": 9}
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {
        "visibility_timeout": settings.VISIBILITY_TIMEOUT_S,
        # Sweep for lapsed leases every few seconds (kombu's default is ~100 s: interval 10 x throttle 10).
        "unacked_restore_interval": settings.restore_interval_s,
        "unacked_restore_throttle": 1,
    }
    return {
        "broker_url": settings.REDIS_URL,
        "result_backend": settings.REDIS_URL,
        # Priorities (Redis): one list per step, `render` (0, served first), then `render<sep>3`,
        # `<sep>6`, `<sep>9`; a worker pops the best non-empty list first. Steps and separator are
        # kombu's defaults, on purpose: a producer that does not load this configuration computes
        # the same list names, so its prioritised messages are consumed (a different `sep` would
        # strand them). Messages without a priority count as 0.
        "broker_transport_options": {
            **transport,
            "priority_steps": list(PRIORITY_STEPS),
            "sep": PRIORITY_SEP,
            "queue_order_strategy": "priority",
        },
        "result_backend_transport_options": dict(transport),
        "broker_connection_retry_on_startup": True,
        # A Redis restart is survived: result reads and writes retry with backoff (up to 10 s apart).
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        # Serialization: JSON only.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Delivery: nothing lost, nothing hoarded.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # queue mode holds only the task it runs; buffer mode holds one more, ready to start.
        "worker_prefetch_multiplier": 2 if settings.WORKER_MODE == "buffer" else 1,
        "task_default_queue": RENDER_QUEUE,
        "task_routes": {
            "tasks.render": {"queue": RENDER_QUEUE},
            "tasks.deliver_webhook": {"queue": settings.WEBHOOK_QUEUE},
        },
        "task_default_priority": PRIORITIES["normal"],
        # Visibility: STARTED and PROGRESS states, events for Flower, extended results.
        "task_track_started": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "result_extended": True,
        "result_expires": settings.RESULT_EXPIRES_S,
        # Time limits and process lifecycle.
        "task_soft_time_limit": settings.RENDER_SOFT_TIME_LIMIT_S,
        "task_time_limit": settings.RENDER_TIME_LIMIT_S,
        "worker_proc_alive_timeout": settings.WORKER_PROC_ALIVE_TIMEOUT_S,
        "worker_concurrency": 1,
        "worker_max_tasks_per_child": settings.WORKER_MAX_TASKS_PER_CHILD or None,
        "worker_max_memory_per_child": settings.WORKER_MAX_MEMORY_PER_CHILD_MB * 1024 or None,  # KiB
        "worker_pool": "prefork",
    }
