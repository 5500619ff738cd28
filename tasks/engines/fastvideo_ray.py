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
6. The address FastVideo places its workers at. FastVideo's ``get_ip()`` reads ``FASTVIDEO_HOST_IP``,
   else asks the kernel for a route to 8.8.8.8 and answers ``0.0.0.0`` where there is none (an
   air-gapped node, a loopback-only pod), while Ray's node is ``127.0.0.1``; its placement group then
   asks for the resource ``node:0.0.0.0``, which no node has. Unless the operator set it,
   ``FASTVIDEO_HOST_IP`` is set to the address of this instance's node, here (logged) and in every Ray
   worker (``setup_worker``: they were started before the address was known).
7. A bounded start. FastVideo waits up to 1800 s for its placement group, silently. Its wait is
   replaced by one of ``FASTVIDEO_RAY_START_TIMEOUT_S`` that ends with ``RayStartFailed``: the group
   asked for, the address FastVideo asked at and Ray's node address, and the fix. The worker then
   falls back as ``ENGINE_FALLBACKS`` allows, or exits (``tasks.worker.selfcheck``).
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
from tasks.errors import FatalWorkerError

__all__ = [
    "SETUP_HOOK", "HOST_IP_ENV", "RayStartFailed", "init_options", "complete_executor", "start", "node_address",
    "release_placement_groups", "stop", "setup_worker", "worker_death",
]  # fmt: skip

log = logging.getLogger("renderfarm.fastvideo.ray")

SETUP_HOOK = f"{__name__}.setup_worker"
HOST_IP_ENV = "FASTVIDEO_HOST_IP"  # read by FastVideo's get_ip(), in this process and in its Ray workers


class RayStartFailed(FatalWorkerError):
    """FastVideo's Ray executor could not start here; the message names the cause and the fix."""


# How the running instance was set up (this process only): the placement-group wait, and who chose the address.
_start: dict[str, Any] = {"timeout_s": 120.0, "address_from": "Ray's node"}


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
    And an executor whose start failed before it made its workers (a placement group not ready) has
    no ``workers`` for its ``__del__`` to shut down ("Exception ignored ... AttributeError" in the
    log): an empty list is its default.
    """
    import abc

    from fastvideo.worker.ray_distributed_executor import RayDistributedExecutor

    if "workers" not in vars(RayDistributedExecutor):
        RayDistributedExecutor.workers = []  # type: ignore[attr-defined]  # each instance assigns its own
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


def start(num_gpus: int, cpu: bool, host_ip: str | None = None, timeout_s: float = 120.0) -> str:
    """Start this process's Ray instance (once), before FastVideo looks for one; the address FastVideo uses.

    ``host_ip``: the operator's ``FASTVIDEO_HOST_IP`` (``None``: Ray's node address is used);
    ``timeout_s``: how long FastVideo's executor may wait for its placement group.
    """
    import ray

    complete_executor()
    _bound_placement_wait(timeout_s)
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # its workers' lines reach the worker log without ANSI colours
        if not faulthandler.is_enabled() and sys.__stderr__ is not None:
            faulthandler.enable(file=sys.__stderr__, all_threads=False)
        main_thread = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
        started = time.perf_counter()
        try:
            ray.init(**init_options(num_gpus, cpu))
        except Exception as exc:  # a Ray that cannot start is a start-up failure like any other (fallbacks)
            raise RayStartFailed(f"Ray did not start in pid {os.getpid()}: {type(exc).__name__}: {exc}") from exc
        finally:
            if sigterm is not None:  # ray.init sets its own (sys.exit); the pool's handler stays in charge
                signal.signal(signal.SIGTERM, sigterm)
        log.info(
            "Ray started in pid %d in %.2fs for FastVideo's executor: %s",
            os.getpid(), time.perf_counter() - started, ray.cluster_resources(),
        )  # fmt: skip
    return _use_address(host_ip, timeout_s)


def node_address() -> str:
    """The address of the Ray node this process belongs to (driver or Ray worker), as Ray itself uses it."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return str(node["NodeManagerAddress"])
    raise RuntimeError(f"Ray lists no node {node_id} for this process")


def _fastvideo_guess() -> str:
    """What FastVideo's ``get_ip()`` answers without ``FASTVIDEO_HOST_IP`` (0.0.0.0 without a default route)."""
    import warnings

    from fastvideo.utils import get_ip

    saved = os.environ.pop(HOST_IP_ENV, None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Failed to get the IP address, using 0.0.0.0": said below, with the fix
            return str(get_ip())
    finally:
        if saved is not None:
            os.environ[HOST_IP_ENV] = saved


def _use_address(host_ip: str | None, timeout_s: float) -> str:
    """Give FastVideo the address of Ray's node, unless the operator chose one (then say if they differ)."""
    node = node_address()
    if host_ip is None:
        guess = _fastvideo_guess()
        os.environ[HOST_IP_ENV] = node
        _start["address_from"] = "Ray's node"
        log.info(
            "%s=%s for FastVideo's Ray executor: the address of this process's Ray node (FastVideo's own guess, "
            "from the default route: %s)", HOST_IP_ENV, node, guess,
        )  # fmt: skip
        return node
    os.environ[HOST_IP_ENV] = host_ip
    _start["address_from"] = "the operator"
    if host_ip == node:
        log.info("%s=%s (set by the operator) for FastVideo's Ray executor: Ray's node address", HOST_IP_ENV, host_ip)
    else:
        log.warning(
            "%s=%s (set by the operator) is not the address of this process's Ray node (%s): FastVideo's placement "
            "group asks for a node at %s; the start gives up after %.0f s (FASTVIDEO_RAY_START_TIMEOUT_S)",
            HOST_IP_ENV, host_ip, node, host_ip, timeout_s,
        )  # fmt: skip
    return host_ip


def _bound_placement_wait(timeout_s: float) -> None:
    """Replace FastVideo's placement-group wait (1800 s, silent) with one of ``timeout_s`` that explains itself."""
    from fastvideo.worker import ray_utils

    _start["timeout_s"] = timeout_s
    ray_utils._wait_until_pg_ready = _wait_for_placement_group  # type: ignore[attr-defined]


def _wait_for_placement_group(group: Any) -> None:
    """FastVideo's ``_wait_until_pg_ready``, bounded: ready, or the group is removed and ``RayStartFailed``."""
    import ray

    timeout_s = _start["timeout_s"]
    log.info("waiting up to %.0fs (FASTVIDEO_RAY_START_TIMEOUT_S) for FastVideo's Ray placement group %s",
             timeout_s, group.bundle_specs)  # fmt: skip
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if ready:
        return
    specs = group.bundle_specs
    ray.util.remove_placement_group(group)
    raise RayStartFailed(placement_diagnosis(specs, timeout_s))


def placement_diagnosis(specs: list[dict[str, float]], timeout_s: float) -> str:
    """Why a placement group of ``specs`` found no place in this instance, and the fix."""
    import ray

    nodes = {str(n["NodeManagerAddress"]): n["Resources"] for n in ray.nodes() if n["Alive"]}
    asked = next((name.removeprefix("node:") for bundle in specs for name in bundle if name.startswith("node:")), None)
    head = (
        f"FastVideo's Ray executor did not start: its placement group {specs} was not ready after {timeout_s:.0f} s "
        "(FASTVIDEO_RAY_START_TIMEOUT_S)."
    )
    ray_nodes = ", ".join(nodes) or "none"
    if asked is not None and asked not in nodes:
        return (
            f"{head} FastVideo asks for a node at {asked} ({HOST_IP_ENV}={os.environ.get(HOST_IP_ENV, '(unset)')}, "
            f"set by {_start['address_from']}) but Ray's node address is {ray_nodes}: no node has {asked}. "
            f"Fix: unset {HOST_IP_ENV} (the worker then uses Ray's node address) or set it to {next(iter(nodes), '?')}."
        )
    wanted: dict[str, float] = {}
    for bundle in specs:
        for name, amount in bundle.items():
            if not name.startswith("node:"):
                wanted[name] = wanted.get(name, 0.0) + amount
    have = {name: nodes.get(asked or "", {}).get(name, 0.0) for name in wanted}
    free = {name: ray.available_resources().get(name, 0.0) for name in wanted}
    return (
        f"{head} FastVideo asks for {wanted} on the node at {asked} (Ray's node address: {ray_nodes}), which has "
        f"{have} ({free} free). Fix: NUM_GPUS at most the GPUs this worker sees (CUDA_VISIBLE_DEVICES, nvidia-smi), "
        "and no other process holding them."
    )


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
    if not os.environ.get(HOST_IP_ENV):  # the operator's value is inherited; else the address of this node
        os.environ[HOST_IP_ENV] = node_address()
    fastvideo_steps.install_in_worker()
    fastvideo_image.install_in_worker()
