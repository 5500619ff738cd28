"""Helpers for the FastVideo tests: process accounting, a worker in its own /dev/shm, a poisoned model.

- ``session_processes(worker)``: every live process in the worker's session (the worker is started
  with ``start_new_session=True``, so everything it ever spawned, orphans included, is counted
  unless it called ``setsid`` itself). ``stop_leaves_nothing(worker)``: warm shutdown, exit 0, none left.
- ``ray_processes(child)``: the private Ray instance a pool child started for FastVideo's Ray executor.
- ``ShmWorker``: the same real worker command, run by ``unshare -m`` (root) with a fresh tmpfs on
  /dev/shm in a private mount namespace: read-only, or tiny. The host's /dev/shm is untouched.
- ``build_poisoned_tiny_wan``: tiny-wan whose text encoder has an 8-token vocabulary: it loads, and
  every render fails inside FastVideo's worker with IndexError (a real fault, no mock).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil

from tests.support import TestWorker, wait_for

__all__ = [
    "session_processes", "stop_leaves_nothing", "fastvideo_workers", "ray_processes", "command_line", "ShmWorker",
    "build_poisoned_tiny_wan", "wait_gone", "can_unshare",
]  # fmt: skip


def session_processes(session_id: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == session_id:
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def stop_leaves_nothing(worker: TestWorker) -> None:
    """Warm shutdown: the worker exits 0 and no process of its session is left behind."""
    session = worker.proc.pid
    assert worker.stop() == 0
    wait_for(lambda: not session_processes(session), 30, "every process of the worker's session to end")


def fastvideo_workers(worker: TestWorker) -> list[psutil.Process]:
    """FastVideo's spawned workers: the pool child's children that run multiprocessing's spawn main."""
    found = []
    for child in worker.pool_children():
        try:
            for grandchild in child.children():
                cmdline = " ".join(grandchild.cmdline())
                if "multiprocessing.spawn" in cmdline and "resource_tracker" not in cmdline:
                    found.append(grandchild)
        except psutil.Error:
            continue
    return found


def ray_processes(pool_child: psutil.Process) -> list[psutil.Process]:
    """The Ray instance a pool child started: its daemons (children) and the raylet's agents and workers."""
    try:
        descendants = pool_child.children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in descendants if (c := command_line(p)).startswith("ray::") or "/site-packages/ray/" in c]


def command_line(proc: psutil.Process) -> str:
    """The process's command line as one string; empty once it is gone."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    def gone() -> bool:
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                continue
        return True

    wait_for(gone, timeout, f"processes {pids} to end")


def can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


class ShmWorker(TestWorker):
    """The documented worker command, with /dev/shm a private tmpfs mounted with ``mount_options``."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path, mount_options: str) -> None:
        script = f'mount -t tmpfs -o {mount_options} renderfarm-test-shm /dev/shm && exec "$@"'
        super().__init__(
            name, env, log_path, ("--without-mingle", "--without-gossip"),
            wrap=("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"),
        )  # fmt: skip


def build_poisoned_tiny_wan(tiny_wan: Path, target: Path) -> Path:
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    if (target / "model_index.json").is_file():
        return target
    tmp = target.with_name(target.name + f".{os.getpid()}.{time.monotonic_ns()}")
    shutil.copytree(tiny_wan, tmp)
    config = UMT5Config.from_pretrained(tiny_wan / "text_encoder")
    config.vocab_size = 8
    torch.manual_seed(0)
    shutil.rmtree(tmp / "text_encoder")
    UMT5EncoderModel(config).save_pretrained(tmp / "text_encoder")
    os.rename(tmp, target)
    return target
