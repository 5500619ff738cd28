"""The videos' records in Redis: one JSON record per video, one sorted index per owner.

``renderfarm:api:video:<id>`` holds what the task does not (owner, prompt, size, seconds,
created and completed times) and expires with the video (``API_VIDEO_TTL_S``);
``renderfarm:api:owner:<name>`` orders an owner's video ids by creation time for ``GET /videos``.
An id whose record expired is dropped from the index when a listing meets it.
"""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["Records"]

_RECORD = "renderfarm:api:video:{id}"
_INDEX = "renderfarm:api:owner:{owner}"


class Records:
    def __init__(self, client: Any, ttl_s: int) -> None:
        self._client, self._ttl = client, ttl_s

    def add(self, record: dict[str, Any]) -> None:
        pipe = self._client.pipeline()
        pipe.set(_RECORD.format(id=record["id"]), json.dumps(record), ex=self._ttl)
        # Microseconds: videos created within one second keep their order (a double holds them exactly).
        pipe.zadd(_INDEX.format(owner=record["owner"]), {record["id"]: time.time_ns() // 1000})
        pipe.expire(_INDEX.format(owner=record["owner"]), self._ttl)
        pipe.execute()

    def get(self, video_id: str, owner: str) -> dict[str, Any] | None:
        """The record, only for its owner (another key's video is as good as absent)."""
        raw = self._client.get(_RECORD.format(id=video_id))
        record = json.loads(raw) if raw else None
        return record if record and record["owner"] == owner else None

    def completed(self, record: dict[str, Any], at: int) -> dict[str, Any]:
        """Note the first time the video was seen completed."""
        record = {**record, "completed_at": at}
        self._client.set(_RECORD.format(id=record["id"]), json.dumps(record), keepttl=True)
        return record

    def remove(self, record: dict[str, Any]) -> None:
        pipe = self._client.pipeline()
        pipe.delete(_RECORD.format(id=record["id"]))
        pipe.zrem(_INDEX.format(owner=record["owner"]), record["id"])
        pipe.execute()

    def page(self, owner: str, after: str | None, limit: int, order: str) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` records after the id ``after``, newest first for ``desc``; and whether more follow."""
        index = _INDEX.format(owner=owner)
        start = 0
        if after is not None:
            rank = self._client.zrevrank(index, after) if order == "desc" else self._client.zrank(index, after)
            if rank is None:
                return [], False
            start = int(rank) + 1
        found: list[dict[str, Any]] = []
        while len(found) < limit + 1:
            want = limit + 1 - len(found)
            stop = start + want - 1
            fetch = self._client.zrevrange if order == "desc" else self._client.zrange
            ids = fetch(index, start, stop)
            if not ids:
                break
            raws = self._client.mget([_RECORD.format(id=i.decode()) for i in ids])
            for video_id, raw in zip(ids, raws, strict=True):
                if raw is None:
                    self._client.zrem(index, video_id)  # expired with its video
                    continue
                found.append(json.loads(raw))
            start = stop + 1 - sum(1 for raw in raws if raw is None)
        return found[:limit], len(found) > limit
