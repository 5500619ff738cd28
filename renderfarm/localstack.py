"""A local render stack on loopback: a real redis-server, an S3 endpoint and real Celery workers.

Used by ``renderfarm demo`` and by the test suite. The S3 endpoint is moto's HTTP server (the
``demo`` extra), standing in for MinIO where Docker is not available; every other part is the
real thing, started as it would be in production.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "ROOT",
    "RedisServer",
    "S3Server",
    "SlowS3Proxy",
    "relay",
    "WorkerProcess",
    "free_port",
    "wait_for",
    "worker_command",
]

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll ``predicate`` until it returns something true; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A real ``redis-server`` on a free loopback port; ``persistent`` keeps an fsync'ed AOF in ``workdir``."""

    def __init__(
        self, workdir: Path, port: int | None = None, persistent: bool = False, password: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make install` (apt-get install redis-server)")
        self.port = port or free_port()
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        self._cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof, *auth, *extra,
                     "--dir", str(workdir)]  # fmt: skip
        import redis

        self.client = redis.Redis.from_url(self.url)
        self.start()

    def start(self) -> None:
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self._ping, 10, "redis-server to answer PING")

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) for the block, as a stalled host would be: connections stay
        open and are even accepted, nothing is answered; it goes on (SIGCONT) after."""
        self._proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash would."""
        self._proc.kill()
        self._proc.wait(10)

    def stop(self) -> None:
        self.client.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)


class S3Server:
    """moto's threaded HTTP S3 endpoint on loopback (accepts any credentials)."""

    def __init__(self, port: int | None = None) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise RuntimeError("the local S3 endpoint needs moto: pip install 'renderfarm[demo]'") from None

        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        self._server.stop()


def worker_command(hostname: str, *extra: str, app: str = "tasks", queue: str = "render") -> list[str]:
    """The documented worker command, run with this interpreter."""
    return [
        sys.executable, "-m", "celery", "-A", app, "worker", "--pool=prefork", "--concurrency=1",
        "-Q", queue, "-n", hostname, "-l", "INFO", *extra,
    ]  # fmt: skip


class WorkerProcess:
    """A real Celery worker subprocess in its own session, its output captured to a log file."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_path: Path,
        extra_args: tuple[str, ...] = (),
        app: str = "tasks",
        queue: str = "render",
        wrap: tuple[str, ...] = (),
        command: list[str] | None = None,
    ) -> None:
        """``wrap`` is a command that runs the worker command as its arguments (e.g. ``unshare ...``);
        ``command`` replaces the worker command (a documented command line as it is written, whose node
        name is ``name@host``), e.g. ``renderfarm worker``."""
        self.name = name
        self.hostname = f"{name}@{socket.gethostname()}"
        self.log_path = log_path
        self._loads_engine = app == "tasks"
        self._log = open(log_path, "wb")  # closed in stop()
        argv = command if command is not None else worker_command(self.hostname, *extra_args, app=app, queue=queue)
        self.proc = subprocess.Popen(
            [*wrap, *argv], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def is_ready(self) -> bool:
        """True once the pool child loaded the engine and the main process consumes."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log[-4000:]}")
        text = self.log
        return ("engine loaded" in text or not self._loads_engine) and " ready." in text

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        wait_for(self.is_ready, timeout, f"worker {self.name} to load its engine", interval=0.1)
        return self

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
        return int(self.proc.returncode)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def relay(source: Any, target: Any, before_send: Callable[[bytes], None] | None = None) -> None:
    """Copy what ``source`` receives to ``target`` until either side closes; then close both."""
    try:
        while data := source.recv(65536):
            if before_send is not None:
                before_send(data)
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.close()


class SlowS3Proxy:
    """A TCP proxy in front of the S3 endpoint that holds every request of ``methods`` for ``delay_s``.

    Makes uploads (PUT) or lookups (HEAD) take real time on loopback, so that overlapping them with
    renders is visible. ``held`` lists (method, path, when it was let through: ``time.monotonic()``).
    """

    def __init__(self, upstream_port: int, delay_s: float, methods: tuple[str, ...] = ("PUT",)) -> None:
        import socket
        import threading

        self.delay_s = delay_s
        self.held: list[tuple[str, str, float]] = []
        self._methods = tuple(f"{m} ".encode() for m in methods)
        self._upstream = ("127.0.0.1", upstream_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.endpoint = f"127.0.0.1:{self.port}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            threading.Thread(target=relay, args=(client, upstream, self._hold), daemon=True).start()
            threading.Thread(target=relay, args=(upstream, client), daemon=True).start()

    def _hold(self, data: bytes) -> None:
        import time

        if data.startswith(self._methods):
            time.sleep(self.delay_s)
            method, path = data.split(b" ", 2)[:2]
            self.held.append((method.decode(), path.decode(errors="replace"), time.monotonic()))

    def stop(self) -> None:
        self._closed.set()
        self._server.close()
