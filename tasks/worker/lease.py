"""Task leases: a running render keeps its message invisible to other workers.

Redis (kombu's transport) hands an unacknowledged message to another worker once it has been
unacknowledged for ``visibility_timeout`` seconds: its delivery time is the score in the
``unacked_index`` sorted set. A short timeout makes a dead node's task move on quickly, but would
hand a long healthy render to a second worker. So the worker's main process, which never runs
the render itself, renews the lease of every message it holds (running or reserved) every
``LEASE_RENEW_S`` seconds by moving its score to now. A node that dies, is reclaimed or paused
stops renewing, and its task is redelivered ``VISIBILITY_TIMEOUT_S`` later.

Held means: running, reserved for the pool, or waiting in the worker's timer for its ETA (a
producer's ``countdown=``, a retry's or a webhook delivery's countdown): without renewal a wait
longer than the visibility timeout would hand the same task to a second worker.

The sorted set's name is kombu's, as configured (``global_keyprefix`` + ``unacked_index_key`` in
``broker_transport_options``, kombu's defaults otherwise). Everything here that reaches into
Celery's or kombu's internals is listed in ``INTERNALS`` and checked by tests/test_internals.py
against the pinned versions (pyproject.toml).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import signals

from worker_config.redis_link import redis_client
from worker_config.settings import get_settings

__all__ = ["INTERNALS", "LeaseKeeper", "held_requests", "install", "unacked_index_name"]

log = logging.getLogger("renderfarm.lease")

INTERNALS = (
    "celery.worker.state.active_requests",  # requests being executed
    "celery.worker.state.reserved_requests",  # requests handed to the pool, not started yet
    "celery.worker.request.Request.message",  # its kombu message (delivery_tag)
    "kombu.asynchronous.timer.Timer.queue",  # the consumer's timer: ETA requests wait there
    "kombu.asynchronous.timer.Entry.args",  # ... as apply_eta_task(request)
    "kombu.transport.redis.Channel.unacked_index_key",  # the sorted set of delivery times
    "kombu.transport.redis.Channel.global_keyprefix",
)


def unacked_index_name(transport_options: dict[str, Any]) -> str:
    """The Redis key of kombu's unacked index under these ``broker_transport_options``."""
    from kombu.transport.redis import Channel

    prefix = transport_options.get("global_keyprefix", Channel.global_keyprefix) or ""
    return f"{prefix}{transport_options.get('unacked_index_key', Channel.unacked_index_key)}"


class LeaseKeeper(threading.Thread):
    """Renews the leases of this worker's unacknowledged messages until stopped."""

    def __init__(self, client: Any, every_s: float, index: str, timer: Any = None) -> None:
        super().__init__(name="renderfarm-lease", daemon=True)
        self._client = client
        self._every = every_s
        self._index = index
        self._timer = timer
        self._stop_event = threading.Event()
        self.renewals = 0

    def run(self) -> None:
        while not self._stop_event.wait(self._every):
            try:
                self.renew_once()
            except Exception as exc:  # noqa: BLE001 - Redis away: the next round tries again
                log.warning("could not renew task leases: %s", exc)

    def renew_once(self) -> int:
        tags = [str(tag) for r in held_requests(self._timer) if (tag := getattr(r.message, "delivery_tag", None))]
        if not tags:
            return 0
        now = time.time()
        # XX: only messages still unacknowledged; an acked or restored message is not brought back.
        renewed = int(self._client.zadd(self._index, dict.fromkeys(tags, now), xx=True, ch=True) or 0)
        self.renewals += 1
        log.debug("renewed %d of %d leases", renewed, len(tags))
        return renewed

    def stop(self) -> None:
        self._stop_event.set()


def held_requests(timer: Any = None) -> list[Any]:
    """This worker's requests whose messages are unacknowledged: running, reserved, and waiting in
    ``timer`` (the consumer's) for their ETA."""
    from celery.worker import state
    from celery.worker.request import Request

    waiting = []
    for scheduled in timer.queue if timer is not None else ():  # a snapshot, safe from this thread
        entry = scheduled.entry
        if not entry.canceled and entry.args and isinstance(entry.args[0], Request):
            waiting.append(entry.args[0])
    return [*state.active_requests, *state.reserved_requests, *waiting]


_KEEPER: LeaseKeeper | None = None


def _start(sender: Any = None, **_: Any) -> None:
    """``worker_ready``: ``sender`` is the worker's consumer (its app and its timer)."""
    global _KEEPER
    settings = get_settings()
    index = unacked_index_name(sender.app.conf.broker_transport_options or {})
    client = redis_client(settings, timeout_s=max(1.0, settings.LEASE_RENEW_S), connect_timeout_s=5)
    _KEEPER = LeaseKeeper(client, settings.LEASE_RENEW_S, index, sender.timer)
    _KEEPER.start()
    log.info(
        "task leases (%s) renewed every %.0fs, tasks waiting for their ETA included (visibility timeout %ds)",
        index,
        settings.LEASE_RENEW_S,
        settings.VISIBILITY_TIMEOUT_S,
    )


def _stop(**_: Any) -> None:
    if _KEEPER is not None:
        _KEEPER.stop()


def install(app: Any) -> None:
    """Run a lease keeper in the worker's main process (``worker_ready`` to ``worker_shutdown``)."""
    signals.worker_ready.connect(_start, weak=False)
    signals.worker_shutdown.connect(_stop, weak=False)
