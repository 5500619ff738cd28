"""The entry point of FastVideo's spawned mp worker, as this project starts it.

FastVideo's ``MultiprocExecutor`` starts each worker with ``spawn`` and the target
``WorkerMultiprocProc.worker_main``, looked up on the class at spawn time. ``install()`` puts
``worker_main`` below in its place; ``spawn`` pickles a function by reference, so the new
interpreter imports this module and runs it. In the spawned worker it:

1. ties the worker's life to the pool child that spawned it: ``PR_SET_PDEATHSIG(SIGKILL)`` first,
   then a check that the parent is still alive (FastVideo sets the same signal itself, but only
   after the seconds its imports take: a pool child killed in that window left an orphan);
2. logs to its inherited stderr (FastVideo's own logging setup is off: see the engine);
3. applies the CPU-compatibility layer (``tasks.engines.fastvideo_cpu``) when the engine said so
   through ``RENDERFARM_FASTVIDEO_CPU=1`` (only set where no accelerator is present);
4. connects the denoising loop to the pool child (``tasks.engines.fastvideo_steps``): per-step
   progress, stopping at a step, and out-of-memory answered instead of raised;
5. runs FastVideo's own ``worker_main`` unchanged: on any other exception it still sends SIGQUIT
   to the pool child, which dies; Celery replaces it and the task is redelivered (``MAX_DELIVERIES``).

Only the mp executor is covered: with ``DISTRIBUTED_EXECUTOR_BACKEND=ray`` Ray starts FastVideo's
workers itself, and ``tasks.engines.fastvideo_ray`` does the same three things there (fate-sharing
is Ray's own; logging and the CPU layer in Ray's worker setup hook).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from typing import Any

__all__ = ["install", "worker_main", "die_with_parent"]

_PR_SET_PDEATHSIG = 1
_original: Any = None


def install() -> None:
    """Make FastVideo's mp executor spawn its workers through ``worker_main`` (idempotent)."""
    global _original
    from fastvideo.worker.multiproc_executor import WorkerMultiprocProc

    current = WorkerMultiprocProc.__dict__["worker_main"]
    if getattr(current, "__func__", None) is worker_main:
        return
    _original = current
    WorkerMultiprocProc.worker_main = staticmethod(worker_main)  # type: ignore[method-assign]


def die_with_parent() -> None:
    """SIGKILL this process when its parent ends; exit now if the parent already has (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the parent died before the signal was armed: nobody would ever stop us


def worker_main(*args: Any, **kwargs: Any) -> None:
    die_with_parent()
    # Its owner runs FastVideo with FASTVIDEO_CONFIGURE_LOGGING=0 (Celery owns logging there); this
    # process has no Celery: its records go to the inherited stderr, prefixed with its pid.
    logging.basicConfig(
        level=logging.INFO, format=f"[fastvideo worker pid {os.getpid()}] %(levelname)s %(name)s: %(message)s"
    )
    from tasks.engines import fastvideo_cpu, fastvideo_image, fastvideo_steps

    if os.environ.get(fastvideo_cpu.CPU_ENV) == "1":
        fastvideo_cpu.apply()
    fastvideo_steps.install_in_worker()
    fastvideo_image.install_in_worker()
    original = _original
    if original is None:  # the spawned interpreter: FastVideo's class still holds its own entry
        from fastvideo.worker.multiproc_executor import WorkerMultiprocProc

        original = WorkerMultiprocProc.__dict__["worker_main"]
    original.__func__(*args, **kwargs)
