"""``renderfarm worker``: the worker command line for this machine's settings and GPUs.

One Celery worker per engine: prefork pool, concurrency 1 (one pool process owns the model),
the render queue (and ``WEBHOOK_QUEUE`` when it is another queue), task events on (``-E``) for
Flower. With several visible GPUs and ``NUM_GPUS`` GPUs per engine, one worker per group, each with
its own ``CUDA_VISIBLE_DEVICES``, node name ``render-gpu<N>@%h`` and ``METRICS_PORT + N``.
Without a GPU: one worker.
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

__all__ = ["WorkerPlan", "visible_gpus", "plan_workers", "run_workers"]


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


def plan_workers(settings: Settings, gpus: list[str], loglevel: str = "INFO", name: str = "render") -> list[WorkerPlan]:
    queues = ["render"] + ([settings.WEBHOOK_QUEUE] if settings.WEBHOOK_QUEUE != "render" else [])

    def argv(node: str) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=prefork", "--concurrency=1",
            "-Q", ",".join(queues), "-E", "-n", f"{node}@%h", "--loglevel", loglevel,
        ]  # fmt: skip

    per = settings.NUM_GPUS
    groups = [gpus[i : i + per] for i in range(0, len(gpus) - per + 1, per)] if gpus else []
    if len(groups) <= 1:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(groups[0])} if groups else {}
        return [WorkerPlan(name, argv(name), env)]
    plans = []
    for index, group in enumerate(groups):
        env = {"CUDA_VISIBLE_DEVICES": ",".join(group)}
        if settings.METRICS_PORT:
            env["METRICS_PORT"] = str(settings.METRICS_PORT + index)
        node = f"{name}-gpu{index}"
        plans.append(WorkerPlan(node, argv(node), env))
    return plans


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
