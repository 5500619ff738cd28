"""The worker's start-up self-check, and the engine plan that follows from it.

Every pool child runs ``startup()`` before its engine loads: it prints a banner (PyTorch version,
CUDA, GPU, the device renders will use, /dev/shm, a real ``spawn`` pool started inside the pool
child itself and, for FastVideo's mp executor, a tensor handed from a spawned process to this one
exactly as the render hands back its video: a CUDA tensor through CUDA IPC on a GPU, a CPU tensor
through shared memory otherwise). A real model whose CUDA is unusable stops the worker with the
diagnosis (``tasks.engines.device``): no silent CPU fallback. When FastVideo's mp executor cannot
run here it says exactly why and what to set, then falls back in the order ``ENGINE_FALLBACKS``
gives (``ray``: FastVideo with the Ray executor; ``diffusers``: the diffusers engine) or raises
``FatalWorkerError`` so the worker exits instead of taking tasks. A FastVideo Ray executor that
does not start (``RayStartFailed``: Ray itself, or its placement group not ready within
``FASTVIDEO_RAY_START_TIMEOUT_S``) follows the same rules: ``fallback_after`` names the next engine
``ENGINE_FALLBACKS`` allows, or the worker exits with the diagnosis.

Operators run the same checks on demand: ``python -m tasks.worker.selfcheck`` (exit 0 when the
configured engine, or a fallback, can run; 1 otherwise). ``run_checks(settings)`` is the API.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker_config.settings import Settings

__all__ = [
    "Check", "Plan", "run_checks", "plan", "fallback_after", "banner", "startup", "main", "semaphores_problem",
    "SHM_FIX",
]  # fmt: skip

SHM = "/dev/shm"
SHM_FIX = (
    "give the container a usable shared memory: `docker run --ipc=host` or `--shm-size=8g` "
    "(compose: `ipc: host` or `shm_size: 8gb`; Salad: the container group's `ipc_mode`/`shm_size` settings; "
    "Kubernetes: an emptyDir with medium Memory mounted at /dev/shm)"
)
_MP_TIMEOUT_S = 60.0
_GIB = 1024**3
_MIB = 1024**2


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    needed_by_mp: bool = False  # a failure means FastVideo's mp executor cannot run here


@dataclass(frozen=True)
class Plan:
    """What this process will load: the engine name and the settings to load it with."""

    engine: str
    settings: Settings
    reason: str
    fallback: bool = False


def _double(x: int) -> int:  # runs in the spawned self-check pool
    return 2 * x


def _tensor_from_child(queue: Any, done: Any, device: str) -> None:  # runs in the spawned self-check process
    import torch

    queue.put(torch.arange(4, dtype=torch.float32, device=device) * 2)
    done.wait(_MP_TIMEOUT_S)  # the tensor's memory must outlive the reader's use of it (CUDA IPC)


def _tensor_check(device: str) -> Check:
    """A tensor made in a spawned process, read in this one: the way FastVideo's mp worker hands back the video
    (a CUDA tensor through CUDA IPC on a GPU, a CPU tensor through shared memory otherwise)."""
    import torch.multiprocessing

    ctx = torch.multiprocessing.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_tensor_from_child, args=(queue, done, device), daemon=True)
    name = "Tensor hand-over"
    try:
        child.start()
        values = queue.get(timeout=_MP_TIMEOUT_S).tolist()
    except Exception as exc:  # noqa: BLE001 - every failure is reported, with its cause
        text = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        return Check(name, False, f"a {device} tensor from a spawned process could not be read here: {text}",
                     _tensor_fix(device), needed_by_mp=True)  # fmt: skip
    finally:
        done.set()
        child.join(_MP_TIMEOUT_S)
        if child.is_alive():
            child.kill()
        queue.close()
    if values != [0.0, 2.0, 4.0, 6.0]:
        return Check(name, False, f"a {device} tensor arrived changed: {values}", _tensor_fix(device), True)
    via = "CUDA IPC" if device == "cuda" else "shared memory"
    return Check(name, True, f"{device} tensor from a spawned process, through {via}")


def _tensor_fix(device: str) -> str:
    if device != "cuda":
        return SHM_FIX
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "(unset)")
    return (
        f"PYTORCH_CUDA_ALLOC_CONF={conf}: with expandable_segments:True, CUDA IPC needs the pidfd_getfd system "
        "call, which Docker's default seccomp profile refuses without CAP_SYS_PTRACE: unset "
        "PYTORCH_CUDA_ALLOC_CONF (or expandable_segments:False), or add the capability (`--cap-add SYS_PTRACE`); "
        "check the driver with nvidia-smi"
    )


def _device_check(settings: Settings) -> tuple[Check, str]:
    """The check, and the device renders would use (the CPU where CUDA is needed but unusable)."""
    from tasks.engines.device import choose_device
    from tasks.errors import FatalWorkerError

    try:
        device = choose_device(settings)
    except FatalWorkerError as exc:
        return Check("Device", False, str(exc), "see above; DEVICE=cpu renders on the CPU on purpose"), "cpu"
    return Check("Device", True, f"{device} (DEVICE={settings.DEVICE})"), device


def _torch_checks() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("PyTorch", False, "not installed (a producer-only install?)", "install the worker extra")]
    cuda = torch.cuda.is_available()
    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none"
    return [
        Check("PyTorch", True, torch.__version__),
        Check("CUDA available", True, str(cuda)),
        Check("GPU", True, gpu),
    ]


def _fastvideo_check() -> Check:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return Check("FastVideo", True, version("fastvideo"))
    except PackageNotFoundError:
        return Check("FastVideo", True, "not installed (ENGINE=fastvideo needs scripts/install-fastvideo.sh)")


def _shm_check(settings: Settings) -> Check:
    try:
        st = os.statvfs(SHM)
    except OSError as exc:
        return Check(SHM, False, f"missing ({exc.strerror})", SHM_FIX, needed_by_mp=True)
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    size = f"{total / _GIB:.1f} GiB, {free / _GIB:.1f} GiB free"
    if st.f_flag & os.ST_RDONLY or not os.access(SHM, os.W_OK):
        return Check(
            SHM, False, f"{size}, read-only: multiprocessing locks and queues cannot be created", SHM_FIX, True
        )
    if free < settings.MIN_SHM_MB * _MIB:
        return Check(
            SHM, False,
            f"{free / _MIB:.0f} MiB free, below MIN_SHM_MB={settings.MIN_SHM_MB}: FastVideo moves tensors between "
            "processes through it and fails with 'unable to allocate shared memory'",
            SHM_FIX, True,
        )  # fmt: skip
    return Check(SHM, True, f"{size}, writable")


def _multiprocessing_check() -> Check:
    ctx = multiprocessing.get_context("spawn")
    try:
        with ctx.Pool(1) as pool:
            result = pool.map_async(_double, [1, 2, 3]).get(timeout=_MP_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, with its cause
        text = f"{type(exc).__name__}: {exc}"
        if "daemonic" in text or "AuthenticationString" in text:
            fix = "call tasks.worker.mp_in_pool.allow_children_in_pool_process() in the pool child first"
        else:
            fix = SHM_FIX
        return Check("Multiprocessing", False, f"a spawn pool failed in pid {os.getpid()}: {text}", fix, True)
    return Check("Multiprocessing", True, str(result))


def semaphores_problem() -> str | None:
    """Why no multiprocessing lock can be created here (None when one can). Celery's prefork pool
    needs them before any pool child exists, so the main process checks this at worker_init."""
    try:  # the fork context unlinks the semaphore at once: no resource-tracker process is started
        multiprocessing.get_context("fork").Lock()
    except OSError as exc:
        return (
            f"cannot create a multiprocessing lock in {SHM} ({exc.strerror}): neither Celery's prefork pool nor "
            f"FastVideo's mp executor can start, and no engine fallback helps. Fix: {SHM_FIX}"
        )
    return None


def run_checks(settings: Settings) -> list[Check]:
    """Run every check in this process (a spawn pool is started and stopped: about a second). The tensor
    hand-over is checked where the render uses it: FastVideo with the mp executor (a few seconds more)."""
    from tasks.engines import choose_engine

    checks = [*_torch_checks()]
    torch_ok = checks[0].ok
    if torch_ok:
        device_check, device = _device_check(settings)
        checks.append(device_check)
    checks += [_fastvideo_check(), _shm_check(settings), _multiprocessing_check()]
    mp_render = choose_engine(settings) == "fastvideo" and settings.DISTRIBUTED_EXECUTOR_BACKEND == "mp"
    if torch_ok and mp_render:
        checks.append(_tensor_check(device))
    return checks


def banner(checks: list[Check]) -> str:
    lines = [f"renderfarm self-check (pid {os.getpid()}):"]
    for check in checks:
        if check.name == "Multiprocessing" and check.ok:
            lines.append(f"  Multiprocessing OK: {check.detail}")
        elif check.ok:
            lines.append(f"  {check.name}: {check.detail}")
        else:
            lines.append(f"  {check.name}: FAILED: {check.detail}")
            if check.fix:
                lines.append(f"    fix: {check.fix}")
    return "\n".join(lines)


def plan(settings: Settings, checks: list[Check]) -> Plan:
    """The engine to load here, given the checks; ``FatalWorkerError`` when nothing can run."""
    from tasks.engines import choose_engine
    from tasks.engines.device import choose_device
    from tasks.errors import FatalWorkerError

    if importlib.util.find_spec("torch") is not None:
        choose_device(settings)  # a real model with unusable CUDA: stop here, with the diagnosis
    engine = choose_engine(settings)
    blocking = [c for c in checks if c.needed_by_mp and not c.ok]
    if engine != "fastvideo" or settings.DISTRIBUTED_EXECUTOR_BACKEND != "mp" or not blocking:
        return Plan(
            engine, settings, f"ENGINE={engine}, DISTRIBUTED_EXECUTOR_BACKEND={settings.DISTRIBUTED_EXECUTOR_BACKEND}"
        )
    why = "; ".join(f"{c.name}: {c.detail}" for c in blocking)
    # Shared memory problems have one fix; the tensor hand-over on a GPU names its own (the allocator).
    own = [SHM_FIX if c.name in (SHM, "Multiprocessing") else c.fix or SHM_FIX for c in blocking]
    fix = "; ".join(dict.fromkeys(own))
    skipped: list[str] = []

    def reason(target: str) -> str:
        passed = f" (skipped: {', '.join(skipped)})" if skipped else ""
        return f"FastVideo's mp executor cannot run here; fallback to {target}{passed}. Cause: {why}. Fix: {fix}"

    for fallback in settings.engine_fallbacks:
        if fallback == "ray":
            if importlib.util.find_spec("ray") is None:
                skipped.append("ray (the ray package is not installed)")
                continue
            update = {"ENGINE": "fastvideo", "DISTRIBUTED_EXECUTOR_BACKEND": "ray"}
            return Plan("fastvideo", settings.model_copy(update=update), reason("the Ray executor"), True)
        if fallback == "diffusers":
            if importlib.util.find_spec("diffusers") is None:
                skipped.append("diffusers (the diffusers package is not installed)")
                continue
            return Plan(
                "diffusers", settings.model_copy(update={"ENGINE": "diffusers"}), reason("the diffusers engine"), True
            )
    tried = f"; fallbacks skipped: {', '.join(skipped)}" if skipped else ""
    raise FatalWorkerError(
        f"FastVideo's mp executor cannot run in this container ({why}). Fix: {fix}. "
        f"ENGINE_FALLBACKS={settings.ENGINE_FALLBACKS or 'none'!s}{tried}"
    )


def fallback_after(chosen: Plan, exc: BaseException) -> Plan | None:
    """What to load when ``chosen`` failed to start with ``exc``: ``None`` when no fallback answers this
    failure (the caller re-raises it); ``FatalWorkerError`` with the diagnosis when one would, but
    ``ENGINE_FALLBACKS`` allows none. Only a FastVideo Ray executor that did not start qualifies: the
    engines after ``ray`` in ``ENGINE_FALLBACKS`` when Ray was itself a fallback, every other one when
    it was configured."""
    from tasks.engines.fastvideo_ray import RayStartFailed
    from tasks.errors import FatalWorkerError

    if not isinstance(exc, RayStartFailed):
        return None
    settings = chosen.settings
    fallbacks = list(settings.engine_fallbacks)
    if chosen.fallback and "ray" in fallbacks:
        fallbacks = fallbacks[fallbacks.index("ray") + 1 :]
    skipped: list[str] = []
    for fallback in fallbacks:
        if fallback != "diffusers":
            continue
        if importlib.util.find_spec("diffusers") is None:
            skipped.append("diffusers (the diffusers package is not installed)")
            continue
        return Plan(
            "diffusers", settings.model_copy(update={"ENGINE": "diffusers"}),
            f"FastVideo's Ray executor did not start; fallback to the diffusers engine. Cause: {exc}", True,
        )  # fmt: skip
    tried = f"; fallbacks skipped: {', '.join(skipped)}" if skipped else ""
    raise FatalWorkerError(
        f"{exc} ENGINE_FALLBACKS={settings.ENGINE_FALLBACKS or 'none'!s} allows no other engine here{tried} "
        "(ENGINE_FALLBACKS=diffusers renders with the diffusers engine instead)."
    ) from exc


def startup(settings: Settings) -> Plan:
    """The pool child's check: print the banner, then decide (or raise ``FatalWorkerError``)."""
    checks = run_checks(settings) if settings.SELFCHECK else []
    if checks:
        print(banner(checks), flush=True)
    chosen = plan(settings, checks)
    if chosen.fallback:
        print(f"renderfarm self-check: {chosen.reason}", flush=True)
    return chosen


def main() -> int:
    """``python -m tasks.worker.selfcheck``: the operator's on-demand check."""
    from tasks.errors import FatalWorkerError
    from tasks.worker.mp_in_pool import allow_children_in_pool_process
    from worker_config.settings import SettingsError, get_settings

    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"renderfarm self-check: {exc}", file=sys.stderr)
        return 2
    allow_children_in_pool_process()
    checks = run_checks(settings)
    print(banner(checks))
    try:
        chosen = plan(settings, checks)
    except FatalWorkerError as exc:
        print(f"  Verdict: FAILED: {exc}")
        return 1
    backend = chosen.settings.DISTRIBUTED_EXECUTOR_BACKEND
    print(f"  Verdict: OK: a worker here loads ENGINE={chosen.engine} (DISTRIBUTED_EXECUTOR_BACKEND={backend})")
    if chosen.fallback:
        print(f"    {chosen.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
