"""FastVideo renders step by step: progress, stopping and out-of-memory across FastVideo's process boundary.

FastVideo runs the denoising loop in its own worker process (the mp executor's spawned worker, or
a Ray actor), where no Celery task, Redis connection or progress callback exists. This module
connects that loop to the pool process, over a channel of its own: a Unix socket in Linux's
abstract namespace (no file, gone with its owner) that the pool process listens on and FastVideo's
worker (rank 0) connects to. Fixed-size messages ``(kind, forward, step, steps)``:

- worker to pool process: ``FROM`` when the denoising loop starts (with the step it starts after:
  0, or the step of the state it resumed from), ``STEP`` after each step, ``STAT`` when the state
  after a step is written (``tasks.engines.fastvideo_state``: a file beside the render's output)
  and ``NOST`` when it was asked for one that this loop cannot give;
- pool process to worker: ``GO`` or ``STOP`` in answer to ``FROM`` (the worker waits for it: the
  storage lookup is answered before the first denoising step, as with diffusers) and to the last
  step (the worker waits again: a cancel seen there stops it before decoding, as with diffusers),
  ``STOP`` when the render's progress callback raised at any other step (cancel, shutdown), and
  ``SAVE`` when the render wants the state after the next step (a checkpoint is due, or the worker
  is shutting down).

In the pool process, ``StepMonitor`` (one thread) calls the render's progress callback for each
step (``("denoising", i, n)``, then ``("decoding", None, None)`` after the last) and its
``Denoising`` hooks (``started``, ``wants_state``, ``take_state`` with the state the worker
wrote). A callback that raises (``RenderCancelled``, ``ServedFromStorage``,
``WorkerShuttingDown``) makes it send ``STOP``; the engine re-raises that exception once
``generate`` is back, after waiting for a state it asked for at that step.

In FastVideo's worker (``install_in_worker``, from ``fastvideo_worker`` for the mp executor and
from ``fastvideo_ray.setup_worker`` for Ray's actors):

1. the denoising stage's progress bar reports each step, writes the state after it when asked (in a
   thread; before stopping, at once) and, when asked, raises ``StopRender`` at that step boundary;
   with several ranks (``NUM_GPUS`` > 1) the ranks agree on stopping with an all-reduce over
   FastVideo's CPU group, so they stop at the same step (rank 0 alone writes the state);
2. the worker's ``execute_forward`` turns ``StopRender`` and an out-of-memory into an ordinary
   answer (an empty output and a note in ``extra``) instead of an exception, which FastVideo's
   worker would answer with SIGQUIT to the pool process (the pool process would die and the task
   be delivered again, the model loaded again). Memory is freed first. It also measures the
   forward's peak memory in the process that runs the model (``tasks.engines.peak_memory``).

``install_in_owner`` makes the executors' ``execute_forward`` raise ``EngineStopped`` for such an
answer, in the pool process, before FastVideo builds a video from the empty output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.engines import ProgressFn, denoising_state, fastvideo_state
from tasks.engines.second_try import cause_of_type

__all__ = [
    "ADDRESS_ENV", "MARKER", "PEAK_KEY", "EngineStopped", "StopRender", "StepMonitor", "engine_stopped",
    "install_in_worker", "install_in_owner", "last_peak_memory",
]  # fmt: skip

if TYPE_CHECKING:
    from tasks.engines import Denoising

log = logging.getLogger("renderfarm.fastvideo.steps")

ADDRESS_ENV = "RENDERFARM_FASTVIDEO_STEPS"  # the abstract socket's name, inherited by FastVideo's workers
MARKER = "renderfarm_stopped"  # in ``ForwardBatch.extra``: why the forward ended early ("stopped" | "out_of_memory")
PEAK_KEY = "renderfarm_peak_memory"  # in ``ForwardBatch.extra``: (MiB, "cuda" | "rss") of the forward
_MESSAGE = struct.Struct("!4sqqq")  # kind, forward number, step, steps
STEP, GO, STOP = b"STEP", b"GO  ", b"STOP"
FROM, SAVE, STAT, NOST = b"FROM", b"SAVE", b"STAT", b"NOST"


class StopRender(Exception):
    """Raised in FastVideo's worker at a step boundary when the pool process asked it to stop."""


class EngineStopped(Exception):
    """Raised in the pool process when FastVideo's worker ended a forward early: ``kind`` says why."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def engine_stopped(exc: BaseException) -> EngineStopped | None:
    """The ``EngineStopped`` behind ``exc`` (FastVideo re-raises its forward thread's error), if any."""
    return cause_of_type(exc, EngineStopped)


# --- the pool process ----------------------------------------------------------------------------


class StepMonitor:
    """Listens for FastVideo's worker and calls the current render's progress callback at each step."""

    def __init__(self) -> None:
        self.name = f"renderfarm-fastvideo-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind("\0" + self.name)
        self._listener.listen(4)
        self._lock = threading.Condition()
        self._progress: ProgressFn | None = None
        self._denoising: Denoising | None = None
        self._output: Path | None = None
        self._state_asked = False  # SAVE sent, STAT or NOST not yet back
        self.error: BaseException | None = None  # what the current render's callback raised
        self.last_step: int | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="fastvideo-steps", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def render(
        self, progress: ProgressFn, denoising: Denoising | None = None, output: Path | None = None
    ) -> Iterator[None]:
        """Route the steps of the render that runs inside this block to ``progress`` and ``denoising``
        (``output``: its MP4's path, beside which FastVideo's worker writes the states asked for)."""
        with self._lock:
            self._progress, self._denoising, self._output = progress, denoising, output
            self.error, self.last_step, self._state_asked = None, None, False
        try:
            yield
        finally:
            with self._lock:
                self._progress = self._denoising = self._output = None

    def settle(self, timeout_s: float) -> bool:
        """Wait until the state asked for last has come (or was refused); False if it did not within ``timeout_s``."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._state_asked, timeout_s)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with conn:
                if not _same_user(conn):
                    continue
                self._converse(conn)

    def _converse(self, conn: socket.socket) -> None:
        while True:
            message = _recv(conn)
            if message is None:
                return  # the worker went (generator rebuilt or shut down)
            kind, forward, step, steps = message
            if kind in (STAT, NOST):
                self._on_state(kind, step)
                continue
            if kind not in (STEP, FROM):
                continue
            for answer in self._on_step(step, steps, start=kind == FROM):
                with contextlib.suppress(OSError):
                    conn.sendall(_MESSAGE.pack(answer, forward, step, steps))

    def _on_step(self, step: int, steps: int, start: bool) -> list[bytes]:
        """Report the step; the answers to send (a start always gets GO or STOP)."""
        with self._lock:
            progress, denoising, stopping = self._progress, self._denoising, self.error is not None
        if stopping:
            return [STOP]
        awaited = start or step == steps  # the worker waits for an answer to these
        if progress is None:  # no render routed here (it ended): let the worker go on
            return [GO] if awaited else []
        answers = []
        try:
            if start:
                if denoising is not None:
                    denoising.started(step)
            elif denoising is not None and not self._state_asked and denoising.wants_state(step):
                with self._lock:
                    self._state_asked = True
                answers.append(SAVE)  # before a STOP: the state where it stops
            progress("denoising", step, steps)
            self.last_step = step
            if step == steps:
                progress("decoding", None, None)
        except BaseException as exc:  # noqa: BLE001 - any callback error stops the render; the engine raises it
            with self._lock:
                self.error = exc
            return [*answers, STOP]
        return [*answers, GO] if awaited else answers

    def _on_state(self, kind: bytes, step: int) -> None:
        """The state the worker wrote after ``step`` (STAT), or its answer that it has none (NOST)."""
        with self._lock:
            denoising, output = self._denoising, self._output
        state = None
        if kind == STAT and output is not None:
            path = fastvideo_state.state_path(output, step)
            try:
                state = denoising_state.read(path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("the state FastVideo's worker wrote after step %d is unreadable: %s", step, exc)
            finally:
                path.unlink(missing_ok=True)
        if state is not None and denoising is not None:
            denoising.take_state(state)
        with self._lock:
            self._state_asked = False
            self._lock.notify_all()


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.getuid():
        log.warning("refused a connection to the FastVideo step channel from uid %d", uid)
        return False
    return True


def _recv(conn: socket.socket) -> tuple[bytes, int, int, int] | None:
    data = b""
    while len(data) < _MESSAGE.size:
        try:
            chunk = conn.recv(_MESSAGE.size - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    kind, forward, step, steps = _MESSAGE.unpack(data)
    return kind, forward, step, steps


_LAST_PEAK: list[Any] = [None]


def last_peak_memory() -> tuple[float, str] | None:
    """The peak memory FastVideo's worker measured for the last forward, (MiB, source), if it did."""
    peak = _LAST_PEAK[0]
    return (float(peak[0]), str(peak[1])) if peak else None


def install_in_owner() -> None:
    """Make the executors' ``execute_forward`` raise ``EngineStopped`` for an early end (idempotent)."""
    from fastvideo.worker.multiproc_executor import MultiprocExecutor

    executors: list[type] = [MultiprocExecutor]
    with contextlib.suppress(ImportError):  # Ray is optional
        from fastvideo.worker.ray_distributed_executor import RayDistributedExecutor

        executors.append(RayDistributedExecutor)
    for executor in executors:
        original = executor.__dict__["execute_forward"]
        if getattr(original, "_renderfarm", False):
            continue

        def execute_forward(self: Any, forward_batch: Any, fastvideo_args: Any, _original: Any = original) -> Any:
            _LAST_PEAK[0] = None
            batch = _original(self, forward_batch, fastvideo_args)
            extra = batch.extra or {}
            _LAST_PEAK[0] = extra.get(PEAK_KEY)
            if (stopped := extra.get(MARKER)) is not None:
                raise EngineStopped(str(stopped[0]), str(stopped[1]))
            return batch

        execute_forward._renderfarm = True  # type: ignore[attr-defined]
        executor.execute_forward = execute_forward  # type: ignore[attr-defined]


# --- FastVideo's worker ---------------------------------------------------------------------------


class _Reporter:
    """The worker's end of the channel (rank 0 talks; every rank takes part in the stop decision)."""

    def __init__(self) -> None:
        self._conn: socket.socket | None = None
        self._forward = 0
        self._stop = False
        self._save = False
        self._sending = threading.Lock()  # the render's thread and a state writer's both send

    def _connection(self) -> socket.socket | None:
        name = os.environ.get(ADDRESS_ENV)
        if self._conn is None and name and _rank() == 0:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect("\0" + name)
            except OSError as exc:
                log.warning("FastVideo step channel %s unreachable (%s): no per-step progress", name, exc)
                conn.close()
                os.environ.pop(ADDRESS_ENV, None)
                return None
            self._conn = conn
        return self._conn

    def started(self, steps: int, from_step: int = 0) -> None:
        """The loop starts after ``from_step`` (0, or a resumed state's): report, and wait for GO or STOP."""
        self._forward += 1
        self._stop = self._save = False
        conn = self._connection()
        if conn is not None and self._send(conn, FROM, self._forward, from_step, steps):
            self._await_answer(conn)
        self._agree_or_raise(from_step)

    def step(self, step: int, steps: int) -> None:
        """After a step: report it, take any SAVE or STOP the pool process sent meanwhile (no waiting;
        after the last step, wait for its GO or STOP: decoding follows), write the state when asked
        (before stopping, at once), and stop when asked."""
        conn = self._connection()
        if conn is not None and self._send(conn, STEP, self._forward, step, steps):
            if step == steps:
                self._await_answer(conn)
            while self._conn is not None and select.select([conn], [], [], 0)[0]:
                answer = _recv(conn)
                if answer is None:
                    self._lost()
                    break
                kind, forward, _, _ = answer
                if forward == self._forward:
                    self._stop = self._stop or kind == STOP
                    self._save = self._save or kind == SAVE
        if self._save and self._conn is not None:
            self._save = False
            self._hand_over_state(self._conn, step, steps, now=self._stop)
        self._agree_or_raise(step)

    def _hand_over_state(self, conn: socket.socket, step: int, steps: int, now: bool) -> None:
        """Write the state after ``step`` beside the render's output and say so (STAT; NOST if there is none)."""
        state = fastvideo_state.capture(step, steps)  # copies on the device, before the next step changes them
        forward = self._forward

        def write() -> None:
            path = None
            try:
                if state is not None:
                    path = fastvideo_state.write_state(state, step)
            except Exception as exc:  # noqa: BLE001 - a checkpoint never stops a render
                log.warning("could not write the state after step %d: %s: %s", step, type(exc).__name__, exc)
            self._send(conn, STAT if path is not None else NOST, forward, step, steps)

        if now:  # stopping: the pool process waits for this state before it gives the render back
            write()
        else:
            threading.Thread(target=write, name="renderfarm-state-writer", daemon=True).start()

    def _await_answer(self, conn: socket.socket) -> None:
        """Block until the pool process answers this forward's step with GO or STOP (a STOP sent
        earlier counts too; a SAVE that comes first is kept)."""
        while (answer := _recv(conn)) is not None:
            kind, forward, _, _ = answer
            if forward != self._forward:
                continue
            self._save = self._save or kind == SAVE
            if kind in (GO, STOP):
                self._stop = self._stop or kind == STOP
                return
        self._lost()

    def _send(self, conn: socket.socket, kind: bytes, forward: int, step: int, steps: int) -> bool:
        try:
            with self._sending:
                conn.sendall(_MESSAGE.pack(kind, forward, step, steps))
        except OSError:
            self._lost()
            return False
        return True

    def _lost(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _agree_or_raise(self, step: int) -> None:
        stop = self._stop
        if _world_size() > 1:  # every rank stops at the same step, or the others would hang in a collective
            import torch
            from fastvideo.distributed.parallel_state import get_world_group

            flag = torch.tensor([1 if stop else 0], dtype=torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=get_world_group().cpu_group)
            stop = bool(flag.item())
        if stop:
            raise StopRender(f"stopped by the pool process after step {step}")


def _rank() -> int:
    import torch.distributed

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world_size() -> int:
    import torch.distributed

    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


_REPORTER = _Reporter()


class _ReportingBar:
    """FastVideo's progress bar, reporting each step to the pool process."""

    def __init__(self, bar: Any, total: int | None) -> None:
        self._bar, self._total, self._done = bar, total or 0, 0

    def __enter__(self) -> _ReportingBar:
        self._bar.__enter__()
        self._done = fastvideo_state.resumed_from()  # the steps a resumed loop skips are done
        try:
            _REPORTER.started(self._total, self._done)
        except BaseException:
            self._bar.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._bar.__exit__(*exc)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)
        self._done += n
        _REPORTER.step(self._done, self._total)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._bar)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


def install_in_worker() -> None:
    """In FastVideo's worker process: report steps, stop on request, resume and hand over the denoising
    state (``fastvideo_state``), survive out-of-memory (idempotent)."""
    from fastvideo.pipelines.stages.denoising import DenoisingStage
    from fastvideo.worker.gpu_worker import Worker

    fastvideo_state.install()

    bar = DenoisingStage.__dict__["progress_bar"]
    if not getattr(bar, "_renderfarm", False):

        def progress_bar(self: Any, iterable: Any = None, total: int | None = None) -> Any:
            return _ReportingBar(bar(self, iterable=iterable, total=total), total)

        progress_bar._renderfarm = True  # type: ignore[attr-defined]
        DenoisingStage.progress_bar = progress_bar  # type: ignore[method-assign]

    forward = Worker.__dict__["execute_forward"]
    if not getattr(forward, "_renderfarm", False):

        def execute_forward(self: Any, forward_batch: Any, fastvideo_args: Any) -> Any:
            return _forward_or_note(forward, self, forward_batch, fastvideo_args)

        execute_forward._renderfarm = True  # type: ignore[attr-defined]
        Worker.execute_forward = execute_forward  # type: ignore[method-assign]


def _forward_or_note(forward: Any, worker: Any, forward_batch: Any, fastvideo_args: Any) -> Any:
    """Run FastVideo's forward; end it with a note in ``extra`` (never an exception) when stopped or out of memory."""
    import torch

    from tasks.engines.oom import first_line, free_memory, is_out_of_memory
    from tasks.engines.peak_memory import PeakMemory

    peak = PeakMemory("cuda" if torch.cuda.is_available() else "cpu")
    peak.start()
    try:
        batch = forward(worker, forward_batch, fastvideo_args)
    except StopRender as exc:
        note = ("stopped", str(exc))
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise  # FastVideo's own handling: SIGQUIT to the pool process
        note = ("out_of_memory", first_line(exc, 300))
    else:
        batch.extra = {**(batch.extra or {}), PEAK_KEY: peak.stop()}
        return batch
    free_memory()
    log.warning("FastVideo forward ended early in pid %d: %s", os.getpid(), note[1])
    from fastvideo.pipelines.pipeline_batch_info import ForwardBatch

    return ForwardBatch(data_type=forward_batch.data_type, output=torch.empty(0), extra={MARKER: note})
