"""Checkpoints of a render's denoising: what one is, where it is kept, how it is saved and found.

**What.** The engine's ``DenoisingState`` after a step (``tasks.engines.denoising_state``: the
latents, the scheduler's whole state with its multistep history, the generator's state), with
what identifies the render (``Identity``: its object key, the model, the model's revision, the
engine and the resolved spec) and a checksum. One object::

    b"RFCKPT\\x00\\x01" | header length (8 bytes, big-endian) | header (JSON) | payload (safetensors)

The header holds the format version, the identity, the step, the engine's plain values and the
payload's sha256 and length. Nothing outside this module reads or writes it.

**Where.** In the farm's bucket under ``checkpoints/``, keyed by the video's content key
(``renders/ab/<hash>.mp4`` -> ``checkpoints/ab/<hash>.ckpt``): any delivery of the same render,
on any worker, finds it. One per render, replaced by each save. Deleted when the video is stored
(``discard``, from stage 7); the bucket's lifecycle rule expires those left behind
(``tasks.pipeline.storage``).

**When.** While the render denoises, every ``CHECKPOINT_EVERY_S`` seconds (0: never): the render's
thread only copies the tensors on their device; a background thread copies them to the host,
encodes and uploads. A save that is due while the previous one is still running is skipped, not
queued. A worker shutting down saves the state it stopped at before it gives the task back
(``save_now``: synchronous, bounded).

**Validity.** A delivery looks for its render's checkpoint while the prompt is encoded (in the
background, like the storage lookup) and continues from it only if it is whole (magic, lengths,
checksum, a readable payload) and the same render (format, key, model, revision, engine, spec,
step count). Anything else is ignored with a warning and the render starts over: a checkpoint
never fails a render, and storage that is down while saving skips that save, never the render.

Events go out as ``tasks.pipeline.events.checkpointed`` (the worker counts them: metrics).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from celery.utils.log import get_task_logger

from tasks.engines import DenoisingState
from tasks.errors import StorageUnavailable
from tasks.pipeline.events import checkpointed
from tasks.pipeline.threads import ProcessPool

__all__ = [
    "CHECKPOINT_PREFIX", "FORMAT", "MAX_CHECKPOINT_BYTES", "Identity", "CheckpointRejected", "Checkpoints",
    "checkpoint_key", "encode", "decode", "discard",
]  # fmt: skip

log = get_task_logger("tasks.render")  # a render's lines, with its task id

CHECKPOINT_PREFIX = "checkpoints/"
FORMAT = 1
MAX_CHECKPOINT_BYTES = 2 * 2**30  # far above any real shape (Wan2.2-5B at 720p: about 84 MB)
_MAGIC = b"RFCKPT\x00\x01"
_LENGTH = struct.Struct("!Q")


@dataclass(frozen=True)
class Identity:
    """What makes a checkpoint this render's: the same video, from the same weights, by the same engine."""

    key: str  # the video's object key (tasks.keys.object_key)
    model: str
    revision: str  # MODEL_REVISION for a Hub model; the build for a built-in one
    engine: str
    spec: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "model": self.model, "revision": self.revision, "engine": self.engine,
                "spec": self.spec}  # fmt: skip


class CheckpointRejected(Exception):
    """A checkpoint that cannot be used: ``kind`` is ``mismatch`` (another render's, or another
    format's) or ``damaged`` (cut short, altered, unreadable payload)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def checkpoint_key(video_key: str) -> str:
    """``checkpoints/ab/<hash>.ckpt`` for the video ``renders/ab/<hash>.mp4``."""
    from tasks.keys import KEY_PREFIX

    return CHECKPOINT_PREFIX + video_key.removeprefix(KEY_PREFIX).removesuffix(".mp4") + ".ckpt"


def encode(identity: Identity, state: DenoisingState) -> bytes:
    """The checkpoint's bytes; ``state``'s tensors on the host (``DenoisingState.to_host``)."""
    from safetensors.torch import save

    payload = save(state.tensors)
    header = {
        "format": FORMAT, "identity": identity.as_dict(), "step": state.step, "steps": state.steps,
        "values": state.values, "payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_bytes": len(payload),
        "created": time.time(), "pid": os.getpid(),
    }  # fmt: skip
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"".join((_MAGIC, _LENGTH.pack(len(head)), head, payload))


def decode(data: bytes, identity: Identity) -> DenoisingState:
    """The state in ``data``; ``CheckpointRejected`` unless it is whole and ``identity``'s."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _LENGTH.size:
        raise CheckpointRejected("damaged", "not a checkpoint (its first bytes are wrong)")
    start = len(_MAGIC) + _LENGTH.size
    (length,) = _LENGTH.unpack_from(data, len(_MAGIC))
    try:
        header = json.loads(data[start : start + length])
    except ValueError as exc:
        raise CheckpointRejected("damaged", f"its header does not parse ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointRejected("damaged", "its header is not an object")
    if header.get("format") != FORMAT:
        raise CheckpointRejected("mismatch", f"format {header.get('format')!r}, this worker reads {FORMAT}")
    saved = header.get("identity") or {}
    if differs := [name for name, value in identity.as_dict().items() if saved.get(name) != value]:
        shown = "".join(f"; its {name}: {saved.get(name)!r}" for name in differs if name != "spec")
        raise CheckpointRejected("mismatch", f"another render's ({', '.join(differs)} differ{shown})")
    payload = data[start + length :]
    checksum = hashlib.sha256(payload).hexdigest()
    if len(payload) != header.get("payload_bytes") or checksum != header.get("payload_sha256"):
        raise CheckpointRejected("damaged", f"its payload ({len(payload)} bytes) does not match its checksum")
    steps = int(identity.spec["num_inference_steps"])
    step = header.get("step")
    if header.get("steps") != steps or not isinstance(step, int) or not 0 < step <= steps:
        raise CheckpointRejected("mismatch", f"step {step!r} of {header.get('steps')!r}; the render has {steps}")
    from safetensors.torch import load

    try:
        tensors = load(payload)
    except Exception as exc:  # noqa: BLE001 - whatever safetensors makes of it, it is no state
        raise CheckpointRejected("damaged", f"its payload does not load ({type(exc).__name__}: {exc})") from None
    return DenoisingState(step=header["step"], steps=steps, tensors=tensors, values=header.get("values") or {})


def discard(store: Any, video_key: str) -> None:
    """The render's video is stored: its checkpoint goes (the lifecycle rule removes it if this fails)."""
    try:
        store.remove(checkpoint_key(video_key))
    except StorageUnavailable as exc:
        log.warning("could not delete the checkpoint of %s (it expires on its own): %s", video_key, exc)


_pool = ProcessPool("renderfarm-checkpoint", 2)  # this process's checkpoint threads: one finds, one saves


class Checkpoints:
    """One render's checkpoints: the one it may resume from, and those it saves while it denoises.

    ``store`` is the bucket (``tasks.pipeline.storage.VideoStore``: ``read_small``, ``put_bytes``,
    ``remove``). The search for a saved one starts at once, in the background.
    """

    def __init__(self, store: Any, identity: Identity, every_s: float) -> None:
        self.identity = identity
        self.key = checkpoint_key(identity.key)
        self.every_s = every_s
        self.saved_step = 0  # the step of the newest checkpoint stored (found or saved) for this render
        self._store = store
        self._found: Future[bytes | None] = _pool().submit(store.read_small, self.key, MAX_CHECKPOINT_BYTES)
        self._saving: Future[None] | None = None
        self._last = time.monotonic()

    # --- at the start of denoising --------------------------------------------------------------

    def resume(self) -> DenoisingState | None:
        """The saved state to continue from; None when there is none or it is unusable (a warning says why)."""
        try:
            data = self._found.result()
        except (StorageUnavailable, ValueError) as exc:  # down, or larger than any checkpoint can be
            self._ignored("unreadable", str(exc))
            return None
        if data is None:
            return None
        try:
            state = decode(data, self.identity)
        except CheckpointRejected as exc:
            self._ignored(exc.kind, exc.detail)
            return None
        self.saved_step = state.step
        return state

    def started(self, step: int) -> None:
        """Denoising began after ``step``: the first save is due ``every_s`` from now."""
        self._last = time.monotonic()
        if step:
            log.info("resuming %s from the checkpoint at step %d of %d", self.identity.key, step,
                     self.identity.spec["num_inference_steps"])  # fmt: skip
            checkpointed.send(sender=self, outcome="resumed", steps=step)

    # --- after a step ---------------------------------------------------------------------------

    def due(self) -> bool:
        """Is a save due now? One that is due while the last is still being saved is skipped."""
        if not self.every_s or time.monotonic() - self._last < self.every_s:
            return False
        self._last = time.monotonic()
        if self._saving is not None and not self._saving.done():
            log.info("checkpoint of %s skipped: the last one is still being saved", self.identity.key)
            checkpointed.send(sender=self, outcome="skipped")
            return False
        return True

    def save(self, state: DenoisingState) -> None:
        """Save ``state`` in the background (copied off the device there)."""
        self._saving = _pool().submit(self._save, state)

    def save_now(self, state: DenoisingState, timeout_s: float) -> bool:
        """Save ``state`` now, after the save in flight, within ``timeout_s`` in all; True if it is stored."""
        deadline = time.monotonic() + timeout_s
        if self._saving is not None:
            self._wait(self._saving, timeout_s)
        if state.step <= self.saved_step:
            return True  # stored already (the one just saved, or the one this delivery resumed from)
        self._saving = _pool().submit(self._save, state)
        return self._wait(self._saving, max(0.0, deadline - time.monotonic())) and self.saved_step >= state.step

    def _wait(self, future: Future[None], timeout_s: float) -> bool:
        try:
            future.result(timeout=timeout_s)
        except TimeoutError:
            log.warning("checkpoint of %s still being saved after %.0fs: going on without it", self.identity.key,
                        timeout_s)  # fmt: skip
            return False
        return True

    def _save(self, state: DenoisingState) -> None:
        started = time.perf_counter()
        try:
            host = state.to_host()
            copied = time.perf_counter()
            data = encode(self.identity, host)
            encoded = time.perf_counter()
            self._store.put_bytes(self.key, data)
        except Exception as exc:  # noqa: BLE001 - a checkpoint never fails a render
            log.warning("checkpoint of %s at step %d not saved (the render goes on): %s: %s", self.identity.key,
                        state.step, type(exc).__name__, exc)  # fmt: skip
            checkpointed.send(sender=self, outcome="failed")
            return
        done = time.perf_counter()
        self.saved_step = max(self.saved_step, state.step)
        log.info("checkpoint of %s at step %d of %d saved: %.1f MB in %.2fs (to host %.3fs, encoding %.3fs, "
                 "upload %.3fs)", self.identity.key, state.step, state.steps, len(data) / 1e6, done - started,
                 copied - started, encoded - copied, done - encoded)  # fmt: skip
        checkpointed.send(sender=self, outcome="written", nbytes=len(data), seconds=done - started)

    def _ignored(self, reason: str, detail: str) -> None:
        log.warning("checkpoint %s ignored (%s: %s): the render starts over", self.key, reason, detail)
        checkpointed.send(sender=self, outcome="ignored", reason=reason)
