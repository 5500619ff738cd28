"""FastVideo's Ray executor (``DISTRIBUTED_EXECUTOR_BACKEND=ray``) inside a pool child.

FastVideo 0.2.1's ``RayDistributedExecutor`` calls ``ray.init()`` itself unless Ray is already
initialised (``initialize_ray_cluster``, fastvideo/worker/ray_utils.py), reserves a placement
group of ``{ray_device_key: 1}`` bundles, one per GPU, and starts one Ray actor per bundle. The
engine owns the Ray instance instead: ``start()`` before the generator loads, ``stop()`` in
``close()``. That settles what FastVideo leaves open:

1. The instance is local and private to this pool child (``address="local"``), without the
   dashboard, usage stats off, and with ``num_cpus=0``: it hosts only FastVideo's actors, which ask
   for no CPU, so Ray prestarts no idle worker per core. Ray's ``ray.init`` SIGTERM handler is undone
   (billiard owns this process's signals), and ``faulthandler`` is enabled on the real stderr first
   (``ray.init`` enables it on ``sys.stderr``, which Celery replaced with a proxy that has no fileno).
2. Its processes end with the pool child. ``stop()`` shuts Ray down. If the child is SIGKILLed,
   Ray's own fate-sharing applies: its daemons (gcs_server, raylet, monitor, log monitor) were
   started with ``PR_SET_PDEATHSIG(SIGKILL)``, Ray's workers (FastVideo's actor included) exit
   within seconds of their raylet, and the raylet's two agents (``ray::DashboardAgent``,
   ``ray::RuntimeEnvAgent``) notice at once but exit only after Ray's 60 s attempt to report the
   death to the (dead) GCS. Measured: all gone about 65 s after the SIGKILL.
3. Every Ray worker process of the instance runs ``setup_worker()`` first (runtime_env
   ``worker_process_setup_hook``, imported by name: the project root is on ``PYTHONPATH``, see
   ``tasks.worker.mp_in_pool``). It logs to the worker's stderr, which Ray streams into the pool
   child's log, applies the CPU-compatibility layer where the engine applied it
   (``RENDERFARM_FASTVIDEO_CPU=1``, ``tasks.engines.fastvideo_cpu``), and connects the denoising
   loop to the pool child (``tasks.engines.fastvideo_steps``, whose channel name it inherits).
4. Without an accelerator (only then), ``ray.init(num_gpus=NUM_GPUS)`` declares that many *logical*
   ``GPU`` slots: Ray checks no hardware for a number given this way, it only schedules against it.
   The CPU layer names ``GPU`` as the CPU platform's Ray device key, so FastVideo's own placement
   group and actors land on those slots, unchanged. With a GPU, Ray counts the real devices.
5. Two gaps in FastVideo 0.2.1's Ray executor, on every platform: it lacks two abstract methods and
   cannot be instantiated at all (``complete_executor``); and its ``shutdown()`` kills its actors but
   keeps its placement group, so the next generator in the same instance fails with "Current node
   has no GPU available" (``release_placement_groups``, called by the engine after each shutdown).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from tasks.engines.second_try import cause_of_type

__all__ = [
    "SETUP_HOOK", "init_options", "complete_executor", "start", "release_placement_groups", "stop", "setup_worker",
    "worker_death",
]  # fmt: skip

log = logging.getLogger("renderfarm.fastvideo.ray")

SETUP_HOOK = f"{__name__}.setup_worker"


def init_options(num_gpus: int, cpu: bool) -> dict[str, Any]:
    """``ray.init`` keyword arguments for the pool child's own Ray instance."""
    options: dict[str, Any] = {
        "address": "local",
        "include_dashboard": False,
        "num_cpus": 0,
        "runtime_env": {"worker_process_setup_hook": SETUP_HOOK},
    }
    if cpu:
        options["num_gpus"] = num_gpus  # logical slots for FastVideo's workers: see the module docstring
    return options


def complete_executor() -> None:
    """Give FastVideo 0.2.1's ``RayDistributedExecutor`` the two methods it lacks (idempotent).

    0.2.1 declares ``set_log_queue`` and ``clear_log_queue`` abstract on ``Executor`` and the Ray
    executor does not define them: ``from_pretrained(..., distributed_executor_backend="ray")`` fails
    with "Can't instantiate abstract class RayDistributedExecutor". Only those two are filled in (any
    other missing method still fails loudly). A ``multiprocessing`` queue cannot reach Ray's worker
    processes; Ray streams their logs to this process itself, and the engine passes no log queue.
    """
    import abc

    from fastvideo.worker.ray_distributed_executor import RayDistributedExecutor

    if not RayDistributedExecutor.__abstractmethods__ & {"set_log_queue", "clear_log_queue"}:
        return
    RayDistributedExecutor.set_log_queue = _set_log_queue  # type: ignore[method-assign]
    RayDistributedExecutor.clear_log_queue = _clear_log_queue  # type: ignore[method-assign]
    abc.update_abstractmethods(RayDistributedExecutor)


def _set_log_queue(self: Any, log_queue: Any) -> None:
    if log_queue is not None:
        raise NotImplementedError("FastVideo's Ray executor cannot forward worker logs to a multiprocessing queue")


def _clear_log_queue(self: Any) -> None:
    return None


def start(num_gpus: int, cpu: bool) -> None:
    """Start this process's Ray instance (once), before FastVideo looks for one."""
    import ray

    complete_executor()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # its workers' lines reach the worker log without ANSI colours
    if not faulthandler.is_enabled() and sys.__stderr__ is not None:
        faulthandler.enable(file=sys.__stderr__, all_threads=False)
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    started = time.perf_counter()
    ray.init(**init_options(num_gpus, cpu))
    if sigterm is not None:  # ray.init sets its own (sys.exit); the pool's handler stays in charge
        signal.signal(signal.SIGTERM, sigterm)
    log.info(
        "Ray started in pid %d in %.2fs for FastVideo's executor: %s",
        os.getpid(), time.perf_counter() - started, ray.cluster_resources(),
    )  # fmt: skip


def release_placement_groups(timeout: float = 30.0) -> None:
    """Remove every placement group of this process's instance (FastVideo's, after its shutdown).

    Removal is asynchronous and FastVideo checks the node's free devices at once when it builds its
    next executor, so this returns once the resources the groups held (``node:`` markers aside) are
    all free again, or after ``timeout`` seconds with a warning.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    if not ray.is_initialized():
        return
    held: set[str] = set()
    for group_id, group in placement_group_table().items():
        if group["state"] != "REMOVED":
            held.update(name for bundle in group["bundles"].values() for name in bundle if not name.startswith("node:"))
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
    deadline = time.monotonic() + timeout
    while held:
        total, free = ray.cluster_resources(), ray.available_resources()
        if all(free.get(name, 0.0) >= total.get(name, 0.0) - 1e-6 for name in held):
            return
        if time.monotonic() > deadline:
            log.warning("Ray resources %s still held %.0fs after their placement groups went", sorted(held), timeout)
            return
        time.sleep(0.05)


def worker_death(exc: BaseException) -> BaseException | None:
    """The Ray actor death behind ``exc``, if that is what it is (else ``None``).

    A Ray actor that dies (killed by the kernel's out-of-memory killer, a crash, a lost node) makes
    ``ray.get`` raise ``RayActorError``; FastVideo 0.2.1 runs the forward pass in a thread and
    re-raises its error as ``RuntimeError("Forward execution thread failed")`` from it, so the
    chain is searched. An exception *raised* inside the actor arrives as ``RayTaskError``, not
    this: the actor is alive and the request is at fault.
    """
    from ray.exceptions import RayActorError

    return cause_of_type(exc, RayActorError)


def stop() -> None:
    """End this process's Ray instance: actors, workers and daemons (idempotent)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
        log.info("Ray shut down in pid %d", os.getpid())


def setup_worker() -> None:
    """Runs first in every Ray worker process of this instance (the runtime_env setup hook)."""
    logging.basicConfig(
        level=logging.INFO, format=f"[ray worker pid {os.getpid()}] %(levelname)s %(name)s: %(message)s"
    )
    from tasks.engines import fastvideo_cpu, fastvideo_image, fastvideo_steps

    if os.environ.get(fastvideo_cpu.CPU_ENV) == "1":
        fastvideo_cpu.apply()
    fastvideo_steps.install_in_worker()
    fastvideo_image.install_in_worker()
