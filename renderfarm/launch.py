"""``renderfarm worker``: the worker command line for this machine's settings and GPUs.

One Celery worker per engine: prefork pool, concurrency 1 (one pool process owns the model), its
model's render queues (``worker_config.routing.worker_queues``: ``render`` and ``render.<model>``
for the default model, only ``render.<model>`` for another; the start line shows what it consumes)
and ``WEBHOOK_QUEUE`` when it is another queue, task events on (``-E``) for Flower. With several
visible GPUs and ``NUM_GPUS`` GPUs per engine, one worker per group, each with its own
``CUDA_VISIBLE_DEVICES`` and ``METRICS_PORT + N``. Without a GPU: one worker.

Node names are distinct per model and GPU: ``render-<model>@%h`` (the model's queue slug, e.g.
``render-tiny-wan``), with ``-gpu<ids>`` for a worker given GPUs (``render-tiny-wan-gpu0``,
``render-tiny-wan-gpu2-3``); ``--name X`` names it ``X`` (``X-gpu<ids>`` with several GPU groups).
Two workers of one name on one host would hide each other in ``renderfarm workers`` and share a
health folder: before starting, ``check_names`` asks the broker whether a worker of that name
answers, and ``renderfarm worker`` refuses to start if one does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker_config.settings import Settings

__all__ = ["WorkerPlan", "check_names", "default_name", "visible_gpus", "plan_workers", "run_workers"]


@dataclass(frozen=True)
class WorkerPlan:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set on top of this process's environment


def visible_gpus(settings: Settings) -> list[str]:
    """GPU ids this machine shows: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list, else none."""
    if settings.CUDA_VISIBLE_DEVICES is not None:
        ids = [item.strip() for item in settings.CUDA_VISIBLE_DEVICES.split(",") if item.strip()]
        return [] if ids in ([], ["-1"]) else ids
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def default_name(settings: Settings) -> str:
    """``render-<model>``: the model's queue slug (``queue_for``), so workers of two models differ."""
    from worker_config.routing import queue_for

    return "render-" + queue_for(settings.MODEL_ID, None).removeprefix("render.")


def plan_workers(
    settings: Settings, gpus: list[str], loglevel: str = "INFO", name: str | None = None
) -> list[WorkerPlan]:
    from worker_config.routing import is_render_queue, worker_queues

    queues = worker_queues(settings.MODEL_ID, settings.DEFAULT_MODEL)
    if not is_render_queue(settings.WEBHOOK_QUEUE) and settings.WEBHOOK_QUEUE not in queues:
        queues.append(settings.WEBHOOK_QUEUE)
    base = name or default_name(settings)

    def argv(node: str) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=prefork", "--concurrency=1",
            "-Q", ",".join(queues), "-E", "-n", f"{node}@%h", "--loglevel", loglevel,
        ]  # fmt: skip

    per = settings.NUM_GPUS
    groups = [gpus[i : i + per] for i in range(0, len(gpus) - per + 1, per)] if gpus else []
    if len(groups) <= 1:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(groups[0])} if groups else {}
        node = base if name or not groups else f"{base}-gpu{'-'.join(groups[0])}"
        return [WorkerPlan(node, argv(node), env)]
    plans = []
    for index, group in enumerate(groups):
        env = {"CUDA_VISIBLE_DEVICES": ",".join(group)}
        if settings.METRICS_PORT:
            env["METRICS_PORT"] = str(settings.METRICS_PORT + index)
        node = f"{base}-gpu{'-'.join(group)}"
        plans.append(WorkerPlan(node, argv(node), env))
    return plans


def check_names(plans: list[WorkerPlan], timeout: float = 1.0) -> list[str]:
    """The planned node names (``name@this host``) a running worker already answers under.

    Asks the broker (``REDIS_URL``) once; a broker that does not answer is no clash (the worker
    itself waits for it at start).
    """
    from celery.utils.nodenames import host_format

    from tasks.celery import app

    nodes = [host_format(f"{plan.name}@%h") for plan in plans]
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_timeout = timeout
    try:
        replies = app.control.ping(destination=nodes, timeout=timeout) or []
    except Exception:  # noqa: BLE001 - no broker yet: nothing to clash with that we can see
        return []
    finally:
        app.close()
    return sorted({name for reply in replies for name in reply if name in nodes})


def run_workers(plans: list[WorkerPlan]) -> int:
    """Run the workers: one replaces this process; several run as children, stopped together."""
    if len(plans) == 1:
        plan = plans[0]
        os.execve(plan.argv[0], plan.argv, {**os.environ, **plan.env})
    children = [subprocess.Popen(plan.argv, env={**os.environ, **plan.env}) for plan in plans]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, forward)
    codes = [child.wait() for child in children]
    return max(codes, key=abs)
