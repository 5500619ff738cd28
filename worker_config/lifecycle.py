"""The worker process lifecycle: the engine is loaded once per pool child and released at exit.

- ``worker_init`` (main process): settings are validated before any child starts; invalid
  settings stop the worker with a message naming the variable.
- ``worker_process_init`` (each pool child, or the main process with ``--pool=solo``): the
  process is made able to start multiprocessing children (``worker_config.mp_in_pool``), the
  self-check prints its banner and picks the engine, falling back where FastVideo's mp executor
  cannot run (``worker_config.selfcheck``), and the engine is loaded into ``ENGINE`` (the one
  owner). If any of it fails, the process prints a diagnosis and stops the whole worker (exit
  code 1): it never takes tasks it cannot run.
- ``worker_process_shutdown``: the engine is released.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from celery import signals

from tasks.errors import EngineNotReady
from worker_config.settings import SettingsError, get_settings

if TYPE_CHECKING:
    from celery import Celery

    from tasks.engines import Engine
    from worker_config.settings import Settings

__all__ = ["ENGINE", "EngineHolder", "install"]

log = logging.getLogger("renderfarm.worker")
EX_ENGINE_FAILED = 1
_MAIN_PID: int | None = None
# Shared with the pool children (created before they fork): set when a child could not load the
# engine, so the main process exits non-zero (Celery's cold shutdown alone exits 0).
_FATAL: Any = None
_WORKER: Any = None  # the main process's WorkController


class EngineHolder:
    """Owns this process's engine: loaded once, used many times, released once."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self.loads = 0
        self.load_seconds: float | None = None

    @property
    def ready(self) -> bool:
        return self._engine is not None

    def load(self, settings: Settings | None = None, name: str | None = None) -> Engine:
        from tasks.engines import load_engine

        settings = settings or get_settings()
        started = time.perf_counter()
        with _sigquit_is_a_load_failure():
            self._engine = load_engine(settings, name)
        self.load_seconds = time.perf_counter() - started
        self.loads += 1
        log.info(
            "engine loaded: engine=%s model=%s device=%s in %.2fs (pid %d, load #%d)",
            self._engine.name, self._engine.model_id, self._engine.device, self.load_seconds, os.getpid(), self.loads,
        )  # fmt: skip
        return self._engine

    def get(self) -> Engine:
        if self._engine is None:
            raise EngineNotReady(
                f"no engine is loaded in process {os.getpid()}: it loads in worker_process_init, "
                "so this code is running outside a worker pool process or after shutdown"
            )
        return self._engine

    def release(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
            log.info("engine released (pid %d)", os.getpid())


ENGINE = EngineHolder()


@contextlib.contextmanager
def _sigquit_is_a_load_failure() -> Iterator[None]:
    """While the engine loads, a SIGQUIT from FastVideo's failing worker must not kill this child silently.

    FastVideo's worker sends SIGQUIT to its owner on any exception. During the load the owner gets
    the error through FastVideo's ready pipe and exits with a diagnosis (``_die``), so the signal is
    only noted. Afterwards billiard installs its own handler (the child exits, Celery redelivers the
    task, capped by MAX_DELIVERIES); the FastVideo engine adds a line saying why.
    """

    def during_load(signum: int, frame: Any) -> None:
        log.error("FastVideo's worker process reported a failure (SIGQUIT) while the engine was loading")

    try:
        previous = signal.signal(signal.SIGQUIT, during_load)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGQUIT, previous)


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _MAIN_PID, _FATAL, _WORKER
    import multiprocessing

    from worker_config.selfcheck import semaphores_problem

    # First: without usable shared memory neither the RawValue below nor Celery's prefork pool can exist.
    if (problem := semaphores_problem()) is not None:
        print(f"renderfarm worker: FATAL: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(1)

    _MAIN_PID, _WORKER = os.getpid(), sender
    _FATAL = multiprocessing.RawValue("i", 0)
    try:
        get_settings()
    except SettingsError as exc:
        print(f"renderfarm worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _on_process_init(**_: Any) -> None:
    from worker_config import selfcheck
    from worker_config.mp_in_pool import allow_children_in_pool_process

    try:
        allow_children_in_pool_process()
        _keep_freed_memory(get_settings().KEEP_FREED_MEMORY_MB)
        plan = selfcheck.startup(get_settings())
        ENGINE.load(plan.settings, plan.engine)
    except BaseException as exc:  # noqa: BLE001 - any load failure is fatal for this worker
        _die(exc)


def _keep_freed_memory(keep_mb: int) -> None:
    """Before the engine loads, so its own allocations and its spawned workers get the settings."""
    from tasks.allocator import keep_freed_memory

    log.info("allocator: %s (KEEP_FREED_MEMORY_MB=%d)", keep_freed_memory(keep_mb), keep_mb)


def _on_process_shutdown(**_: Any) -> None:
    ENGINE.release()


def _on_shutting_down(**_: Any) -> None:
    # Runs in the main process's signal handler, after a child asked for the cold shutdown.
    if _FATAL is not None and _FATAL.value and _WORKER is not None:
        _WORKER.exitcode = EX_ENGINE_FAILED


def _die(exc: BaseException) -> None:
    """Print a diagnosis, stop the whole worker (cold shutdown, exit 1) and end this process."""
    settings = get_settings()
    print(
        f"renderfarm worker: FATAL: the engine failed to load in pid {os.getpid()} "
        f"(MODEL_ID={settings.MODEL_ID}, ENGINE={settings.ENGINE or 'auto'}): {type(exc).__name__}: {exc}\n"
        "The worker stops instead of taking tasks it cannot run.\n" + "".join(traceback.format_exception(exc)),
        file=sys.stderr,
        flush=True,
    )
    main = _MAIN_PID if _MAIN_PID is not None else os.getppid()
    if main == os.getpid():  # --pool=solo: this is the main process
        os._exit(EX_ENGINE_FAILED)
    if _FATAL is not None:
        _FATAL.value = 1
    os.kill(main, signal.SIGQUIT)  # Celery's cold shutdown of the main process
    os._exit(EX_ENGINE_FAILED)


def install(app: Celery) -> None:
    """Connect the lifecycle hooks (they only fire in worker processes)."""
    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_process_init.connect(_on_process_init, weak=False)
    signals.worker_process_shutdown.connect(_on_process_shutdown, weak=False)
    signals.worker_shutting_down.connect(_on_shutting_down, weak=False)
