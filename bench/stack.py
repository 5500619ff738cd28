"""The benchmark's local stack: redis-server, S3 endpoint, workers; and small statistics helpers."""

from __future__ import annotations

import os
import platform
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from renderfarm.localstack import RedisServer, S3Server, WorkerProcess

__all__ = ["Stack", "local_stack", "pct", "machine", "replace_section"]


class Stack:
    def __init__(self, workdir: Path, redis: RedisServer, s3: S3Server) -> None:
        self.workdir, self.redis, self.s3 = workdir, redis, s3
        self._workers: list[WorkerProcess] = []

    def worker(
        self, name: str, wait: bool = True, app: str = "tasks", queue: str = "render", **env: str
    ) -> WorkerProcess:
        """A real worker of ``app`` on ``queue`` with extra settings ``env``."""
        proc = WorkerProcess(name, {**os.environ, **env}, self.workdir / f"{name}.log",
                             ("--without-mingle", "--without-gossip"), app=app, queue=queue)  # fmt: skip
        self._workers.append(proc)
        return proc.wait_ready(300) if wait else proc

    def stop(self) -> None:
        for worker in self._workers:
            worker.stop()


@contextmanager
def local_stack(model_cache: Path | None = None) -> Iterator[Stack]:
    """Start Redis and S3 on loopback and point this process's settings at them."""
    workdir = Path(tempfile.mkdtemp(prefix="renderfarm-bench-"))
    redis = RedisServer(workdir)
    s3 = S3Server()
    os.environ.update(
        REDIS_URL=redis.url,
        MINIO_ENDPOINT=s3.endpoint,
        MINIO_ACCESS_KEY="bench",
        MINIO_SECRET_KEY=secrets.token_hex(8),
        MINIO_BUCKET="bench",
        MODEL_ID="tiny-wan",
        ENGINE="diffusers",
        SPOOL_DIR=str(workdir / "spool"),
        WORKER_MAX_TASKS_PER_CHILD="0",
    )
    if model_cache is not None:
        os.environ["MODEL_CACHE_DIR"] = str(model_cache)
    stack = Stack(workdir, redis, s3)
    try:
        yield stack
    finally:
        stack.stop()
        s3.stop()
        redis.stop()


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of ``values``."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def machine() -> dict[str, Any]:
    import celery
    import diffusers
    import torch

    cpu = "unknown"
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1) if match else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "celery": celery.__version__,
        "redis_server": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2],
    }


def replace_section(path: Path, name: str, body: str) -> None:
    """Write ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
