"""Celery configuration for long GPU jobs, derived from settings.

Two parts: ``app_config(broker)`` is what every process that talks to the farm uses (the app
module applies it, so a producer reads only the broker's settings); ``celery_config(settings)``
adds what only a worker reads (time limits, prefetch, leases, process lifecycle), applied by the
``celery worker`` command before it reads its own options (``tasks.celery``).

Why each value (see docs/settings.md for the operator's view):
- JSON only: no pickle on the wire or in results; other content types are refused.
- acks_late + reject_on_worker_lost + prefetch 1: a task is acknowledged only after it finished,
  so a worker that dies gives its task back, and no worker hoards work it cannot start.
- a short visibility timeout with a lease renewed while the task runs (tasks/worker/lease.py):
  a healthy render is never handed to a second worker, a dead node's task moves on in minutes.
- worker_proc_alive_timeout above the model load: Celery's 4 s default SIGKILLs every
  replacement child that loads a model, in a loop.
- a Redis outage of a few minutes is waited out, not failed: result and state writes retry
  (``result_backend_max_retries``, about 4 minutes with Celery's backoff of up to 10 s) and a
  producer's ``.get()`` reconnects once a second for ``REDIS_OUTAGE_S`` (tests/test_redis_outage.py).
  A refused password is not an outage: the result backend (worker_config/redis_backend.py) ends
  at once, naming it, where Celery's own would retry it for those 4 minutes (tests/test_redis_auth.py).
- Redis Sentinel where REDIS_URL names sentinels: a failover is a Redis outage of a few seconds,
  survived as above (tests/test_sentinel.py, docs/reliability.md#sentinel).
- message priorities (high 0, normal 3, low 9) on kombu's default Redis priority lists, so a
  busy farm takes high before normal before low, from any producer (docs/api.md#priority).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker_config.redis_link import backend_url, transport_options
from worker_config.routing import RENDER_QUEUE, RenderRouter
from worker_config.settings import BrokerSettings, Settings

__all__ = [
    "RENDER_QUEUE", "PRIORITIES", "PRIORITY_STEPS", "PRIORITY_SEP", "REDIS_OUTAGE_S", "app_config", "celery_config",
    "priority_lists",
]  # fmt: skip

# Message priorities on the Redis transport: 0 is served first, 9 last (kombu's steps 0, 3, 6, 9;
# a priority between two steps counts as the lower step number, e.g. 5 as 3).
PRIORITIES = {"high": 0, "normal": 3, "low": 9}
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"


def priority_lists(queue: str, sep: str = PRIORITY_SEP, steps: Sequence[int] = PRIORITY_STEPS) -> list[str]:
    """The Redis lists that hold ``queue``'s messages, one per priority step (kombu's names)."""
    return [queue if step == 0 else f"{queue}{sep}{step}" for step in steps]


# How long a producer's .get() keeps reconnecting to a Redis that went away (once a second).
REDIS_OUTAGE_S = 240
# The result backend's own connection retries (Celery's `retry_policy`, default 20 tries a second
# apart): a pub/sub reconnect during .get() and each result write use it.
_BACKEND_RETRY = {"max_retries": REDIS_OUTAGE_S, "interval_start": 0, "interval_step": 1, "interval_max": 1}


def app_config(broker: BrokerSettings) -> dict[str, Any]:
    """What every process that talks to the farm uses: producers, the CLI, Flower and workers."""
    # Redis Sentinel: the master's name (and the sentinels' password) for the broker and, separately,
    # the result backend; nothing for a single server.
    sentinel = transport_options(broker)
    return {
        "broker_url": broker.REDIS_URL,
        # Celery's Redis backend, except that a refused password fails at once (worker_config/redis_backend.py).
        "result_backend": backend_url(broker.REDIS_URL),
        # Priorities (Redis): one list per step, `render` (0, served first), then `render<sep>3`,
        # `<sep>6`, `<sep>9`; a worker pops the best non-empty list first. Steps and separator are
        # kombu's defaults, on purpose: a producer that does not load this configuration computes
        # the same list names, so its prioritised messages are consumed (a different `sep` would
        # strand them). Messages without a priority count as 0.
        "broker_transport_options": {
            "priority_steps": list(PRIORITY_STEPS),
            "sep": PRIORITY_SEP,
            "queue_order_strategy": "priority",
            **sentinel,
        },
        "broker_connection_retry_on_startup": True,
        # A Redis restart or outage is survived: result reads and writes retry with backoff (up to
        # 10 s apart, random: 60 tries last about 4 minutes), a waiting .get() reconnects.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 60,
        "result_backend_transport_options": {"retry_policy": dict(_BACKEND_RETRY), **sentinel},
        "redis_socket_connect_timeout": 5,  # a Redis that does not answer is retried, not waited on for minutes
        # Serialization: JSON only.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Delivery: nothing lost (a task's own options, bound when the app is finalised).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": RENDER_QUEUE,
        # Each render to its model's queue (worker_config/routing.py); a producer needs nothing else.
        "task_routes": [RenderRouter(broker.DEFAULT_MODEL)],
        "task_default_priority": PRIORITIES["normal"],
        # Visibility: STARTED and PROGRESS states, a sent event for Flower.
        "task_track_started": True,
        "task_send_sent_event": True,
        # Not extended: an extended result stores the task's arguments in Redis next to its result,
        # and a webhook URL may carry a token (tests/test_webhooks.py checks every stored state).
        "result_extended": False,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """A worker's configuration: ``app_config`` and what only a worker reads (applied when it starts)."""
    base = app_config(settings)
    transport = {
        "visibility_timeout": settings.VISIBILITY_TIMEOUT_S,
        # Sweep for lapsed leases every few seconds (kombu's default is ~100 s: interval 10 x throttle 10).
        "unacked_restore_interval": settings.restore_interval_s,
        "unacked_restore_throttle": 1,
        # The sweep holds a Redis lock while it runs; kombu's lock lasts 300 s, so a worker cut off
        # mid-sweep (a GPU node losing its network) stopped every other worker's sweep for 5 minutes
        # (tests/test_partition.py). Restoring a message is a transaction, safe to run twice.
        "unacked_mutex_expire": 3 * settings.restore_interval_s,
    }
    return {
        **base,
        "broker_transport_options": {**transport, **base["broker_transport_options"]},
        "result_backend_transport_options": {**base["result_backend_transport_options"], **transport},
        # queue mode holds only the task it runs; buffer mode holds one more, ready to start.
        "worker_prefetch_multiplier": 2 if settings.WORKER_MODE == "buffer" else 1,
        "task_routes": [*base["task_routes"], {"tasks.deliver_webhook": {"queue": settings.WEBHOOK_QUEUE}}],
        "worker_send_task_events": True,
        "result_expires": settings.result_expires_s,
        # Time limits and process lifecycle.
        "task_soft_time_limit": settings.RENDER_SOFT_TIME_LIMIT_S,
        "task_time_limit": settings.RENDER_TIME_LIMIT_S,
        "worker_proc_alive_timeout": settings.WORKER_PROC_ALIVE_TIMEOUT_S,
        "worker_concurrency": 1,
        "worker_max_tasks_per_child": settings.WORKER_MAX_TASKS_PER_CHILD or None,
        "worker_max_memory_per_child": settings.WORKER_MAX_MEMORY_PER_CHILD_MB * 1024 or None,  # KiB
        "worker_pool": "prefork",
    }
