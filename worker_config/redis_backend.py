"""The result backend of every farm process: Celery's Redis (or Sentinel) backend, except that a
refused password is not an outage.

Celery's Redis backend retries every redis-py ``ConnectionError`` as an outage, under the farm's
policy (``celery_config``: a read or a write retried 60 times, about 4 minutes; a ``.get()``'s
pub/sub reconnected once a second for ``REDIS_OUTAGE_S``), and redis-py's ``AuthenticationError``
is a ``ConnectionError``. A missing or wrong password in REDIS_URL therefore hung ``renderfarm
status`` for about 4 minutes before a ``BackendGetMetaError``, and ``render.delay()`` for 240 s.
Here an authentication error ends at once with ``RedisAuthError``, which names the password:
reads (``get_task_meta``) are not retried, and a connection retry (``ensure``: result writes, the
pub/sub of ``.get()`` and of ``apply_async``) stops at its first refusal. Everything else is
Celery's, unchanged: a Redis that restarts is still waited out.

Selected by ``app_config`` through the ``result_backend`` URL, in Celery's form for a backend
class with its URL: ``worker_config.redis_backend:RedisBackend+redis://...``
(``worker_config.redis_link.backend_url``; Celery imports this module when the app first uses its
backend, so importing the app costs nothing more).
"""

from __future__ import annotations

from typing import Any

from celery.backends import redis as celery_redis

from worker_config.redis_link import RedisAuthError, auth_error, auth_message

__all__ = ["INTERNALS", "RedisBackend", "ResultConsumer", "SentinelBackend"]

# Celery's internals overridden here (checked by tests/test_internals.py against the pinned versions).
INTERNALS = (
    "celery.app.backends.by_url",  # reads "module:Class+URL"
    "celery.backends.base.Backend.exception_safe_to_retry",  # asked before a read or write is retried
    "celery.backends.base.Backend.get_task_meta",
    "celery.backends.redis.RedisBackend.on_connection_error",  # the errback of ensure()'s retry_over_time
    "celery.backends.redis.RedisBackend.ensure",
    "celery.backends.redis.SentinelBackend",
    "celery.backends.redis.ResultConsumer._reconnect_pubsub",
    "celery.backends.redis.ResultConsumer._locked",
)


class _RefusedIsNotAnOutage:
    """Mixed into Celery's Redis backends (before them in the MRO)."""

    url: str | None

    def _refused(self, exc: BaseException) -> RedisAuthError:
        found = auth_error(exc) or exc
        return found if isinstance(found, RedisAuthError) else RedisAuthError(auth_message(self.url or "", found))

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return auth_error(exc) is None and bool(super().exception_safe_to_retry(exc))  # type: ignore[misc]

    def on_connection_error(self, max_retries: Any, exc: BaseException, intervals: Any, retries: int) -> Any:
        # kombu's retry_over_time asks this for the next interval: raising ends the retries.
        if auth_error(exc) is not None:
            raise self._refused(exc) from exc
        return super().on_connection_error(max_retries, exc, intervals, retries)  # type: ignore[misc]

    def get_task_meta(self, task_id: str, cache: bool = True) -> Any:
        try:
            return super().get_task_meta(task_id, cache)  # type: ignore[misc]
        except Exception as exc:
            if auth_error(exc) is not None:
                raise self._refused(exc) from exc
            raise


class ResultConsumer(celery_redis.ResultConsumer):
    """Celery's pub/sub consumer of ``.get()``, closing the connections it drops when it reconnects.

    Celery's reconnect (after Redis went away) forgets its pub/sub and resets the connection pool,
    which drops the pool's connections without closing them: their sockets stayed open until the
    garbage collector found them (an unclosed-socket ``ResourceWarning`` in a producer that waited
    across an outage, one more open socket per reconnect until then). Here the old pub/sub and the
    pool's idle connections are closed first; connections another thread is using are left to it.
    """

    def _reconnect_pubsub(self) -> None:
        with self._locked():
            old: Any = self._pubsub  # type: ignore[has-type]
            self._pubsub = None
            if old is not None:
                try:
                    old.close()
                except Exception:  # noqa: BLE001 - its connection is already gone
                    pass
            self.backend.client.connection_pool.disconnect(inuse_connections=False)
            super()._reconnect_pubsub()


class RedisBackend(_RefusedIsNotAnOutage, celery_redis.RedisBackend):
    """``redis://``, ``rediss://`` and ``unix://`` results."""

    ResultConsumer = ResultConsumer


class SentinelBackend(_RefusedIsNotAnOutage, celery_redis.SentinelBackend):
    """Results on the master a set of Redis Sentinels names."""

    ResultConsumer = ResultConsumer
