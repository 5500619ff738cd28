"""Cancelling a render without killing the warm model process, and saying what came of it.

``cancel(task_id, app=None, wait_s=5.0)`` asks for the cancel, waits up to ``wait_s`` seconds and
returns a ``Cancellation``: its ``outcome`` (an ``Outcome``) and the details to show (``message()``,
``as_dict()``). ``renderfarm cancel`` prints it; an HTTP layer maps it (suggested: ``stopped`` and
``revoked`` 200, ``queued`` and ``running`` 202, ``finished`` and ``failed`` 409, ``unknown`` 404).

- ``stopped``: it was running and ended ``REVOKED`` on this request, ``stage`` (and ``step`` of
  ``steps`` while denoising) saying where; or a worker discarded it before it started (no stage).
- ``queued``: it waits in a render queue (``where``: the queue), or a worker holds it without having
  started it (prefetched, or waiting for its countdown): it is discarded when a worker gets to it.
- ``running``: it had not stopped when the wait ended (a step longer than the wait, or its upload
  under way, which is never cut: then it finishes). The cancel stands.
- ``finished`` (``SUCCESS``, with its ``key``), ``failed`` (``FAILURE``, with its ``error``),
  ``revoked`` (cancelled before): nothing more to do. A render that finished before this call is
  left alone (no flag, no revoke).
- ``unknown``: no state and no message anywhere (see below).

How the cancel is asked: a flag in Redis (``CANCEL_KEY``, kept ``FLAG_TTL_S``) that a running
render watches from a thread (``tasks.pipeline.cancelling``) and acts on at its next denoising
step or stage boundary (before decoding, encoding and uploading; in buffer mode once more just
before its background upload starts: an upload under way is never cut, the video is then stored
and the render reported ``SUCCESS``); and Celery's revoke, so a worker that receives the task
discards it (the flag is also checked at admission, for workers started after the revoke).

Unknown or queued: Celery answers ``PENDING`` for both, and nothing the farm writes remembers a
task it has only sent (``task-sent`` events are not stored; the gateway keeps records of its own
videos only). So the queues are searched for the message itself (``find_message``), twice a
quarter second apart: every render queue's lists (``render``, ``render.<model>``, each priority
step) and the messages workers hold unacknowledged (kombu's ``unacked`` hash), in one server-side
script. This happens before the revoke, since Celery's revoke writes ``REVOKED`` at once for any
task no worker has started, sent or not. Where no message is found the id is ``unknown``: never
sent, mistyped, sent to a queue outside ``render*``, or finished so long ago that its result
expired (``result_expires``). Only the flag is raised for it (no revoke, which would record an id
nobody sent as ``REVOKED``): should it turn up, it stops at admission. Limits: the search costs
Redis time in proportion to the bytes queued (a long queue of large inline images), and it
matches the id as the message carries it (ids of letters, digits and ``-`` are safe).

A producer's face: it imports no worker-only module.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "CANCEL_KEY", "FLAG_TTL_S", "INTERNALS", "Cancellation", "Outcome", "StopPoint", "cancel", "find_message",
    "raise_flag", "request_cancel",
]  # fmt: skip

# kombu's internals the message search relies on (checked by tests/test_internals.py): the names of
# the unacknowledged messages' hash and the key prefix; its values are [message, exchange, routing key].
INTERNALS = (
    "kombu.transport.redis.Channel.global_keyprefix",
    "kombu.transport.redis.Channel.unacked_key",
    "kombu.transport.redis.QoS.append",  # writes that hash
)

CANCEL_KEY = "renderfarm:cancel:{task_id}"
FLAG_TTL_S = 7 * 24 * 3600  # longer than any task waits in a queue


@dataclass(frozen=True)
class StopPoint:
    """Where a cancelled render stopped: during ``stage`` (at ``step`` of ``steps``), or at the boundary
    before ``stage`` began (``before``). Its ``reason()`` is the text of the task's ``REVOKED`` state."""

    stage: str
    step: int | None = None
    steps: int | None = None
    before: bool = False

    def reason(self) -> str:
        if self.before:
            return f"cancelled by request before stage {self.stage!r}"
        at = f" at step {self.step}/{self.steps}" if self.step is not None and self.steps else ""
        return f"cancelled by request during stage {self.stage!r}{at}"

    @classmethod
    def parse(cls, reason: str) -> StopPoint | None:
        """The point a ``reason()`` names; None for any other text (Celery's own ``revoked``)."""
        if (found := _REASON.search(reason)) is None:
            return None
        step, steps = found["step"], found["steps"]
        return cls(found["stage"], int(step) if step else None, int(steps) if steps else None,
                   before=found["when"] == "before stage")  # fmt: skip

    def describe(self) -> str:
        if self.before:
            return f"before {self.stage}"
        return f"during {self.stage}" + (f" at step {self.step}/{self.steps}" if self.step is not None else "")


_REASON = re.compile(r"cancelled by request (?P<when>during stage|before stage) '(?P<stage>\w+)'"
                     r"(?: at step (?P<step>\d+)/(?P<steps>\d+))?")  # fmt: skip


class Outcome(StrEnum):
    STOPPED = "stopped"
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Cancellation:
    """What a cancel came to. ``state`` is the Celery state last read; the other fields per outcome."""

    task_id: str
    outcome: Outcome
    state: str
    stage: str | None = None  # stopped, revoked: where it stopped; running: the stage it is in
    step: int | None = None
    steps: int | None = None
    before: bool = False  # stopped at the boundary before ``stage``
    key: str | None = None  # finished: the video's object key
    error: str | None = None  # failed: "Type: message"; revoked, stopped: the reason
    where: str | None = None  # queued: the queue, or "worker" (held by a worker, not started)
    waited_s: float = 0.0

    def message(self) -> str:
        """One line for a person."""
        point = StopPoint(self.stage, self.step, self.steps, self.before).describe() if self.stage else None
        render = f"render {self.task_id}"
        if self.outcome is Outcome.STOPPED:
            if point is None:
                return f"{render} was discarded by its worker before it started (REVOKED)"
            return f"{render} stopped {point} (REVOKED); nothing was stored, its worker keeps its model loaded"
        if self.outcome is Outcome.QUEUED:
            if self.where == "worker":
                return (f"{render} is held by a worker that has not started it (prefetched, or waiting for its "
                        "countdown): it is discarded when the worker gets to it")  # fmt: skip
            return f"{render} is still queued (in {self.where}): it is discarded when a worker receives it"
        if self.outcome is Outcome.RUNNING:
            doing = f" ({self.stage}{f' {self.step}/{self.steps}' if self.step is not None else ''})"
            return (f"{render} is still running{doing if self.stage else ''} after {self.waited_s:.1f}s: the cancel "
                    "stands, it stops at its next step or stage boundary (an upload under way finishes)")  # fmt: skip
        if self.outcome is Outcome.FINISHED:
            return f"{render} had finished (SUCCESS) before it could be stopped: {self.key}"
        if self.outcome is Outcome.FAILED:
            return f"{render} had failed (FAILURE): {self.error}"
        if self.outcome is Outcome.REVOKED:
            return f"{render} was cancelled already" + (f", {point}" if point else f" ({self.error})")
        return (f"no render {self.task_id} is known: no state, and no message in a render queue or held by a "
                f"worker (a mistyped id, or one whose result expired); the cancel stands for "
                f"{FLAG_TTL_S // 86400} days should it turn up")  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome.value, "message": self.message()}


def request_cancel(task_id: str, app: Any = None) -> None:
    """Only ask: raise the flag a running render watches and revoke the task (queued: discarded).

    Celery's revoke also writes ``REVOKED`` (reason ``revoked``) at once for a task no worker has
    started: its state says so while its message still waits, and the worker that receives it drops it.
    """
    app = _app(app)
    raise_flag(app, task_id)
    app.control.revoke(task_id)


def cancel(task_id: str, app: Any = None, wait_s: float = 5.0, poll_s: float = 0.1) -> Cancellation:
    """Ask for ``task_id`` to be cancelled, wait up to ``wait_s`` seconds, say what happened.

    Raises what the broker raises when Redis cannot be reached (a refused password at once:
    ``worker_config.redis_link.RedisAuthError``).
    """
    app = _app(app)
    started = time.monotonic()
    meta = _meta(app, task_id)
    if meta["status"] in _FINAL:
        return _final(task_id, meta, already=True, waited=0.0)
    if meta["status"] in ("PENDING", "RETRY"):  # queued, or unknown: told apart before Celery's revoke marks it
        found = _find_twice(app, task_id, meta)
        if isinstance(found, str):
            request_cancel(task_id, app)
            return Cancellation(task_id, Outcome.QUEUED, meta["status"], where=found,
                                waited_s=time.monotonic() - started)  # fmt: skip
        meta = found
        if meta["status"] == "RETRY":  # its next attempt is a message in flight
            request_cancel(task_id, app)
            return Cancellation(task_id, Outcome.QUEUED, "RETRY", where="worker", waited_s=time.monotonic() - started)
        if meta["status"] == "PENDING":
            # No revoke: Celery would record REVOKED for an id nobody sent. The flag stops it if it turns up.
            raise_flag(app, task_id)
            return Cancellation(task_id, Outcome.UNKNOWN, "PENDING", waited_s=time.monotonic() - started)
        if meta["status"] in _FINAL:
            return _final(task_id, meta, already=True, waited=time.monotonic() - started)
    request_cancel(task_id, app)
    while True:
        waited = time.monotonic() - started
        if meta["status"] in _FINAL:
            if meta["status"] in ("SUCCESS", "FAILURE"):  # too late: a task sent again under this id may run
                app.backend.client.delete(CANCEL_KEY.format(task_id=task_id))
            return _final(task_id, meta, already=False, waited=waited)
        if waited >= wait_s:
            info = meta["result"] if isinstance(meta.get("result"), dict) else {}
            return Cancellation(task_id, Outcome.RUNNING, meta["status"], stage=info.get("stage"),
                                step=info.get("step"), steps=info.get("steps"), waited_s=waited)  # fmt: skip
        time.sleep(poll_s)
        meta = _meta(app, task_id)


def _find_twice(app: Any, task_id: str, meta: dict[str, Any]) -> str | dict[str, Any]:
    """Where the message of a task not started is; else its state read again. Searched twice, a
    quarter second apart: a worker moving it from its queue to its unacknowledged set holds it in
    neither for an instant, and one that starts it meanwhile changes its state."""
    for attempt in range(2):
        if (where := find_message(app, task_id)) is not None:
            return where
        if attempt == 0:
            time.sleep(0.25)
            meta = _meta(app, task_id)
            if meta["status"] not in ("PENDING", "RETRY"):
                break
    return meta


def raise_flag(app: Any, task_id: str) -> None:
    """Raise the cancel flag a running render watches (and a worker checks at admission); nothing else."""
    app.backend.client.set(CANCEL_KEY.format(task_id=task_id), "1", ex=FLAG_TTL_S)


_FINAL = ("SUCCESS", "FAILURE", "REVOKED")


def _app(app: Any) -> Any:
    if app is None:
        from tasks.celery import app
    return app


def _meta(app: Any, task_id: str) -> dict[str, Any]:
    return app.backend.get_task_meta(task_id, cache=False)  # type: ignore[no-any-return]


def _final(task_id: str, meta: dict[str, Any], already: bool, waited: float) -> Cancellation:
    status, result = meta["status"], meta.get("result")
    if status == "SUCCESS":
        key = result.get("key") if isinstance(result, dict) else None
        return Cancellation(task_id, Outcome.FINISHED, status, key=key, waited_s=waited)
    if status == "FAILURE":
        return Cancellation(task_id, Outcome.FAILED, status, error=f"{type(result).__name__}: {result}",
                            waited_s=waited)  # fmt: skip
    reason = str(result) if result is not None else "revoked"
    point = StopPoint.parse(reason)
    outcome = Outcome.REVOKED if already else Outcome.STOPPED
    if point is None:
        return Cancellation(task_id, outcome, status, error=reason, waited_s=waited)
    return Cancellation(task_id, outcome, status, stage=point.stage, step=point.step, steps=point.steps,
                        before=point.before, error=reason, waited_s=waited)  # fmt: skip


# Searches the render queues' lists (KEYS but the last) and the unacknowledged messages (the last
# KEY, kombu's hash of [message, exchange, routing key]) for a message of task ARGV[1]: a plain
# substring search first, then the message's own id (headers.id, or properties.correlation_id).
# Returns {"queue", key} or {"worker", key}, or false. Server-side: nothing is sent back but the answer.
_FIND_LUA = """
local id = ARGV[1]
local function carries(raw, nested)
  if not string.find(raw, id, 1, true) then return false end
  local ok, value = pcall(cjson.decode, raw)
  if not ok or type(value) ~= 'table' then return false end
  if nested then value = value[1] end
  if type(value) ~= 'table' then return false end
  local headers, properties = value['headers'], value['properties']
  return (type(headers) == 'table' and headers['id'] == id)
      or (type(properties) == 'table' and properties['correlation_id'] == id)
end
for i = 1, #KEYS - 1 do
  if redis.call('TYPE', KEYS[i])['ok'] == 'list' then
    local length = redis.call('LLEN', KEYS[i])
    for start = 0, length - 1, 100 do
      for _, raw in ipairs(redis.call('LRANGE', KEYS[i], start, start + 99)) do
        if carries(raw, false) then return {'queue', KEYS[i]} end
      end
    end
  end
end
local unacked = KEYS[#KEYS]
if redis.call('TYPE', unacked)['ok'] == 'hash' then
  for _, raw in ipairs(redis.call('HVALS', unacked)) do
    if carries(raw, true) then return {'worker', unacked} end
  end
end
return false
"""


def find_message(app: Any, task_id: str) -> str | None:
    """Where the message of ``task_id`` is: a render queue's name, ``"worker"`` (a worker holds it
    unacknowledged: prefetched, waiting for a countdown, or just started), or None."""
    from kombu.transport.redis import Channel

    from worker_config.celery_config import PRIORITY_SEP
    from worker_config.routing import RENDER_QUEUE

    options = app.conf.broker_transport_options or {}
    prefix = options.get("global_keyprefix", Channel.global_keyprefix) or ""
    sep = options.get("sep", PRIORITY_SEP)
    client = app.backend.client
    pattern = f"{_glob_escape(prefix + RENDER_QUEUE)}[.{_glob_escape(sep[:1])}]*"
    lists = [f"{prefix}{RENDER_QUEUE}", *(k.decode() if isinstance(k, bytes) else k
                                          for k in client.scan_iter(match=pattern, count=1000))]  # fmt: skip
    unacked = f"{prefix}{options.get('unacked_key', Channel.unacked_key)}"
    found = client.eval(_FIND_LUA, len(lists) + 1, *lists, unacked, task_id)
    if not found:
        return None
    kind, key = (part.decode() if isinstance(part, bytes) else part for part in found)
    return "worker" if kind == "worker" else key.removeprefix(prefix).split(sep)[0]


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
