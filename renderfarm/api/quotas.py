"""Per-key limits, kept in Redis so that every gateway replica counts the same:

- a rate: video creations per minute (``API_RATE_LIMIT_PER_MIN``), in fixed one-minute windows
  (``renderfarm:api:rate:<key name>:<minute>``, an INCR that expires after two minutes);
- a concurrency quota: videos queued or rendering at once (``API_MAX_ACTIVE``), a set of the key's
  video ids (``renderfarm:api:active:<key name>``) from which finished ones are pruned, by their
  state in the result backend, before each count.

A creation is added to the set first and counted after, so two racing requests can both be
refused, never both admitted over the quota.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["Quotas", "QuotaExceeded"]

_RATE = "renderfarm:api:rate:{owner}:{minute}"
_ACTIVE = "renderfarm:api:active:{owner}"
_FINAL = {"SUCCESS", "FAILURE", "REVOKED"}


class QuotaExceeded(Exception):
    def __init__(self, message: str, retry_after_s: int, code: str) -> None:
        super().__init__(message)
        self.retry_after_s, self.code = retry_after_s, code


class Quotas:
    def __init__(
        self, client: Any, per_minute: int, max_active: int, state_of: Callable[[list[str]], list[str]]
    ) -> None:
        """``state_of(ids)``: each task's state in the result backend (PENDING when unknown)."""
        self._client, self._per_minute, self._max_active, self._state_of = client, per_minute, max_active, state_of

    def admit(self, owner: str, video_id: str) -> None:
        """Count a creation by ``owner``; QuotaExceeded (nothing counted against the quota) when over."""
        if self._per_minute:
            minute = int(time.time() // 60)
            key = _RATE.format(owner=owner, minute=minute)
            pipe = self._client.pipeline()
            pipe.incr(key)
            pipe.expire(key, 120)
            count = int(pipe.execute()[0])
            if count > self._per_minute:
                raise QuotaExceeded(f"Rate limit reached: {self._per_minute} videos a minute for this key",
                                    60 - int(time.time()) % 60, "rate_limit_exceeded")  # fmt: skip
        if self._max_active:
            key = _ACTIVE.format(owner=owner)
            self._client.sadd(key, video_id)
            self._client.expire(key, 24 * 3600)  # a key idle for a day starts afresh
            members = [m.decode() if isinstance(m, bytes) else m for m in self._client.smembers(key)]
            finished = [i for i, state in zip(members, self._state_of(members), strict=True) if state in _FINAL]
            if finished:
                self._client.srem(key, *finished)
            if len(members) - len(finished) > self._max_active:
                self._client.srem(key, video_id)
                message = (
                    f"Too many videos in progress: at most {self._max_active} queued or rendering for this key; "
                    "wait for one to finish or delete one"
                )
                raise QuotaExceeded(message, 5, "concurrency_limit")

    def release(self, owner: str, video_id: str) -> None:
        """A deleted video no longer counts."""
        self._client.srem(_ACTIVE.format(owner=owner), video_id)
