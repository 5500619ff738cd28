"""Task leases: a running render keeps its message invisible to other workers.

Redis (kombu's transport) hands an unacknowledged message to another worker once it has been
unacknowledged for ``visibility_timeout`` seconds: its delivery time is the score in the
``unacked_index`` sorted set. A short timeout makes a dead node's task move on quickly, but would
hand a long healthy render to a second worker. So the worker's main process, which never runs
the render itself, renews the lease of every message it holds (running or reserved) every
``LEASE_RENEW_S`` seconds by moving its score to now. A node that dies, is reclaimed or paused
stops renewing, and its task is redelivered ``VISIBILITY_TIMEOUT_S`` later.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import signals

from worker_config.settings import get_settings

__all__ = ["LeaseKeeper", "install", "UNACKED_INDEX"]

log = logging.getLogger("renderfarm.lease")
UNACKED_INDEX = "unacked_index"  # kombu's Redis transport default (`unacked_index_key`)


class LeaseKeeper(threading.Thread):
    """Renews the leases of this worker's unacknowledged messages until stopped."""

    def __init__(self, redis_url: str, every_s: float) -> None:
        super().__init__(name="renderfarm-lease", daemon=True)
        import redis

        self._client = redis.Redis.from_url(redis_url, socket_timeout=max(1.0, every_s), socket_connect_timeout=5)
        self._every = every_s
        self._stop_event = threading.Event()
        self.renewals = 0

    def run(self) -> None:
        while not self._stop_event.wait(self._every):
            try:
                self.renew_once()
            except Exception as exc:  # noqa: BLE001 - Redis away: the next round tries again
                log.warning("could not renew task leases: %s", exc)

    def renew_once(self) -> int:
        tags = _held_delivery_tags()
        if not tags:
            return 0
        now = time.time()
        # XX: only messages still unacknowledged; an acked or restored message is not brought back.
        renewed = int(self._client.zadd(UNACKED_INDEX, dict.fromkeys(tags, now), xx=True, ch=True) or 0)
        self.renewals += 1
        log.debug("renewed %d of %d leases", renewed, len(tags))
        return renewed

    def stop(self) -> None:
        self._stop_event.set()


def _held_delivery_tags() -> list[str]:
    from celery.worker import state

    tags = []
    for request in (*state.active_requests, *state.reserved_requests):
        tag = getattr(request.message, "delivery_tag", None)
        if tag:
            tags.append(str(tag))
    return tags


_KEEPER: LeaseKeeper | None = None


def _start(**_: Any) -> None:
    global _KEEPER
    settings = get_settings()
    _KEEPER = LeaseKeeper(settings.REDIS_URL, settings.LEASE_RENEW_S)
    _KEEPER.start()
    log.info(
        "task leases renewed every %.0fs (visibility timeout %ds)",
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
