"""Real servers and real worker processes for the tests, all on loopback.

- ``RedisServer``: a real ``redis-server`` (Debian package) on a free port, no persistence.
- ``S3Server``: moto's threaded HTTP S3 endpoint, the MinIO stand-in (see FIELD_NOTES.md).
- ``WorkerProcess``: a real ``celery -A tasks worker --pool=prefork --concurrency=1 -Q render``
  subprocess, configured only through its environment, with its log captured to a file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make install` (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        import redis

        self.client = redis.Redis.from_url(self.url)
        wait_for(self._ping, 10, "redis-server to answer PING")

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def stop(self) -> None:
        self.client.close()
        self._proc.terminate()
        self._proc.wait(10)


class S3Server:
    def __init__(self, port: int | None = None) -> None:
        from moto.server import ThreadedMotoServer

        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def client(self):  # noqa: ANN201 - minio.Minio
        from minio import Minio

        return Minio(self.endpoint, access_key="test-access", secret_key="test-secret", secure=False, region="us-east-1")

    def stop(self) -> None:
        self._server.stop()


class WorkerProcess:
    """A real Celery worker subprocess (prefork, concurrency 1, queue ``render``)."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.hostname = f"{name}@{socket.gethostname()}"
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=prefork", "--concurrency=1",
            "-Q", "render", "-n", self.hostname, "-l", "INFO", "--without-mingle", "--without-gossip", *extra_args,
        ]  # fmt: skip
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        """Until the pool child has loaded the engine and the main process consumes."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log[-4000:]}")
            text = self.log
            return "engine loaded" in text and " ready." in text

        wait_for(ready, timeout, f"worker {self.name} to load its engine", interval=0.1)
        return self

    def pool_children(self) -> list[psutil.Process]:
        """The worker's direct child processes (its pool)."""
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30) -> int:
        """Warm shutdown (SIGTERM); SIGKILL the whole process group if it does not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
