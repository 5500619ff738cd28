"""Per-key limits, kept in Redis so that every gateway replica counts the same:

- a rate: video creations per minute (``API_RATE_LIMIT_PER_MIN``), in fixed one-minute windows
  (``renderfarm:api:rate:<key name>:<minute>``, an INCR that expires after two minutes);
- a concurrency quota: videos queued or rendering at once (``API_MAX_ACTIVE``), a set of the key's
  video ids (``renderfarm:api:active:<key name>``) from which finished ones are pruned, by their
  state in the result backend, before each count.

A creation is added to the set first and counted after, so two racing requests can both be
refused, never both admitted over the quota. Only creations that are made use up the rate: one
refused by either quota gives its count back at once, and one that could not be queued (Redis
failed after its admission: 503) gives back its count and its place (``refund``). A create that
Redis failed during its admission may still count against its minute's rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["Admission", "Quotas", "QuotaExceeded"]

_RATE = "renderfarm:api:rate:{owner}:{minute}"
_ACTIVE = "renderfarm:api:active:{owner}"
_FINAL = {"SUCCESS", "FAILURE", "REVOKED"}


class Admission(NamedTuple):
    """A creation counted: by whom, which video, in which minute."""

    owner: str
    video_id: str
    minute: int


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

    def admit(self, owner: str, video_id: str) -> Admission:
        """Count a creation by ``owner``; QuotaExceeded (nothing counted) when over either quota."""
        minute = int(time.time() // 60)
        if self._per_minute:
            pipe = self._client.pipeline()
            pipe.incr(_RATE.format(owner=owner, minute=minute))
            pipe.expire(_RATE.format(owner=owner, minute=minute), 120)
            if int(pipe.execute()[0]) > self._per_minute:
                self._client.decr(_RATE.format(owner=owner, minute=minute))
                raise QuotaExceeded(f"Rate limit reached: {self._per_minute} videos a minute for this key",
                                    60 - int(time.time()) % 60, "rate_limit_exceeded")  # fmt: skip
        admission = Admission(owner, video_id, minute)
        try:
            self._hold_place(owner, video_id)
        except QuotaExceeded:
            self.refund(admission)
            raise
        return admission

    def _hold_place(self, owner: str, video_id: str) -> None:
        if not self._max_active:
            return
        key = _ACTIVE.format(owner=owner)
        self._client.sadd(key, video_id)
        self._client.expire(key, 24 * 3600)  # a key idle for a day starts afresh
        members = [m.decode() if isinstance(m, bytes) else m for m in self._client.smembers(key)]
        finished = [i for i, state in zip(members, self._state_of(members), strict=True) if state in _FINAL]
        if finished:
            self._client.srem(key, *finished)
        if len(members) - len(finished) > self._max_active:
            message = (
                f"Too many videos in progress: at most {self._max_active} queued or rendering for this key; "
                "wait for one to finish or delete one"
            )
            raise QuotaExceeded(message, 5, "concurrency_limit")

    def refund(self, admission: Admission) -> None:
        """A creation admitted but not made after all (over the concurrency quota, or Redis failing before
        it was queued): its rate count and its place are given back."""
        pipe = self._client.pipeline()
        if self._per_minute:
            pipe.decr(_RATE.format(owner=admission.owner, minute=admission.minute))
        pipe.srem(_ACTIVE.format(owner=admission.owner), admission.video_id)
        pipe.execute()

    def release(self, owner: str, video_id: str) -> None:
        """A deleted video no longer counts (against the concurrency quota; its creation still does)."""
        self._client.srem(_ACTIVE.format(owner=owner), video_id)
