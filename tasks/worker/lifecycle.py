"""The worker process lifecycle: the engine is loaded once per pool child and released at exit.

- Before it: the worker command validated the settings (invalid ones stop the worker with a
  message naming the variable, exit code 2) and applied the worker's Celery configuration
  (``tasks.celery``).
- ``celeryd_init`` (main process, the first signal a starting ``celery worker`` sends):
  ``tasks.render`` gets its body, the pipeline, and ``tasks.deliver_webhook`` is declared, both
  with their retry policies from settings.
- ``worker_init`` (main process): without usable shared memory the worker stops at once; so it
  does when Redis refuses REDIS_URL's password or speaks TLS to a plain ``redis://`` URL (exit
  code 2, the fix named: ``worker_config.redis_link.first_contact``). A Redis that is merely away
  is waited for, as Celery retries.
- ``worker_process_init`` (each pool child, or the main process with ``--pool=solo``): the
  spool is swept (``SPOOL_MAX_AGE_S``, and ``.part`` files of killed processes), the
  process is made able to start multiprocessing children (``tasks.worker.mp_in_pool``), the
  self-check prints its banner and picks the engine, falling back where FastVideo's mp executor
  cannot run (``tasks.worker.selfcheck``), and the engine is loaded into ``ENGINE`` (the one
  owner, ``tasks.engines.holder``); an engine that fails to start in a way a fallback answers
  (FastVideo's Ray executor) is followed by the fallback ``ENGINE_FALLBACKS`` allows. If any of
  it fails, the process prints a diagnosis and stops the whole worker (exit code 1): it never
  takes tasks it cannot run. A worker that is not a render worker (``tasks.worker.queues``: e.g.
  ``-Q webhooks``) loads no engine.
- ``worker_shutting_down`` (main process, SIGTERM or SIGINT: Celery's warm shutdown): the shutdown
  flag every pool child reads at each denoising step is set (``tasks.pipeline.stopping``, armed at
  ``worker_init`` before the pool forks): a running render stops at its next step, saves a
  checkpoint and gives its task back to the queue, so the worker exits within seconds instead of
  waiting for the render to end.
- ``worker_process_shutdown``: queued background uploads finish, then the engine is released.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from celery import signals

from tasks.engines import choose_engine
from tasks.engines.holder import ENGINE
from tasks.pipeline import resources
from tasks.pipeline.render import run
from tasks.pipeline.s7_upload import UPLOADER
from tasks.pipeline.stopping import SHUTDOWN
from tasks.render import use_pipeline
from tasks.worker import queues, selfcheck
from tasks.worker.allocator import cuda_allocator, keep_freed_memory
from tasks.worker.mp_in_pool import allow_children_in_pool_process
from worker_config.redis_link import first_contact
from worker_config.settings import get_settings

if TYPE_CHECKING:
    from celery import Celery

    from worker_config.settings import Settings

__all__ = ["INTERNALS", "install"]

# Celery's internals this relies on (checked by tests/test_internals.py against the pinned versions).
INTERNALS = ("celery.worker.worker.WorkController.exitcode",)  # what `celery worker` exits with

log = logging.getLogger("renderfarm.worker")
EX_ENGINE_FAILED = 1
EX_REDIS_URL = 2  # like invalid settings: REDIS_URL's password or scheme is wrong
_MAIN_PID: int | None = None
# Shared with the pool children (created before they fork): set when a child could not load the
# engine, so the main process exits non-zero (Celery's cold shutdown alone exits 0).
_FATAL: Any = None
_WORKER: Any = None  # the main process's WorkController


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


def _on_celeryd_init(**_: Any) -> None:
    # The worker's settings were validated and its configuration applied by the worker command
    # (tasks.celery); what remains are the tasks' bodies and retry policies.
    settings = get_settings()
    use_pipeline(run, max_retries=settings.STORAGE_MAX_RETRIES)
    # Declared here, not imported by the producer's face: its retry policy is the worker's settings.
    import tasks.pipeline.webhook_delivery  # noqa: F401


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _MAIN_PID, _FATAL, _WORKER
    import multiprocessing

    # First: without usable shared memory neither the RawValue below nor Celery's prefork pool can exist.
    if (problem := selfcheck.semaphores_problem()) is not None:
        print(f"renderfarm worker: FATAL: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(1)

    # A refused password or a plain redis:// to a TLS server is a wrong REDIS_URL, not an outage to wait out.
    if (fault := first_contact(get_settings())) is not None:
        if fault.certain:
            print(f"renderfarm worker: FATAL: {fault.what}; fix: {fault.fix}", file=sys.stderr, flush=True)
            raise SystemExit(EX_REDIS_URL)
        log.warning("%s; fix: %s", fault.what, fault.fix)

    _MAIN_PID, _WORKER = os.getpid(), sender
    _FATAL = multiprocessing.RawValue("i", 0)
    SHUTDOWN.arm()


def _on_process_init(**_: Any) -> None:
    if not queues.serves_renders():
        log.info("no engine in pid %d: this worker consumes no render queue", os.getpid())
        return
    try:
        allow_children_in_pool_process()
        settings = get_settings()
        _keep_freed_memory(settings.KEEP_FREED_MEMORY_MB)
        # Before the self-check: its tensor hand-over proves the path with the allocator the render uses.
        log.info("CUDA allocator: %s", cuda_allocator(choose_engine(settings), settings.DISTRIBUTED_EXECUTOR_BACKEND))
        _sweep_spool(settings)
        plan = selfcheck.startup(settings)
        with _sigquit_is_a_load_failure():
            try:
                ENGINE.load(plan.settings, plan.engine)
            except Exception as exc:  # a start failure a fallback answers (FastVideo's Ray executor)
                fallback = selfcheck.fallback_after(plan, exc)  # FatalWorkerError: none allowed
                if fallback is None:
                    raise
                print(f"renderfarm self-check: {fallback.reason}", flush=True)
                ENGINE.load(fallback.settings, fallback.engine)
    except BaseException as exc:  # noqa: BLE001 - any load failure is fatal for this worker
        _die(exc)


def _sweep_spool(settings: Settings) -> None:
    """Files of killed processes and videos nothing will come back for (``SPOOL_MAX_AGE_S``)."""
    removed = resources.spool().sweep(settings.SPOOL_MAX_AGE_S)
    if removed:
        log.info("spool: removed %d stale file(s): %s", len(removed), ", ".join(p.name for p in removed[:5]))


def _keep_freed_memory(keep_mb: int) -> None:
    """Before the engine loads, so its own allocations and its spawned workers get the settings."""
    log.info("allocator: %s (KEEP_FREED_MEMORY_MB=%d)", keep_freed_memory(keep_mb), keep_mb)


def _on_process_shutdown(**_: Any) -> None:
    UPLOADER.drain()
    ENGINE.release()


def _on_shutting_down(how: str | None = None, **_: Any) -> None:
    # Runs in the main process's signal handler: a warm shutdown (SIGTERM), or the cold one a child
    # asked for. Either way the pool children stop at their next denoising step.
    SHUTDOWN.set()
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
    signals.celeryd_init.connect(_on_celeryd_init, weak=False)
    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_process_init.connect(_on_process_init, weak=False)
    signals.worker_process_shutdown.connect(_on_process_shutdown, weak=False)
    signals.worker_shutting_down.connect(_on_shutting_down, weak=False)
