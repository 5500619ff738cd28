"""The chaos soak's farm: Redis, storage behind a switch, workers in slots, and an orchestrator.

- Redis: a real ``redis-server`` with its fsync'ed append-only file (``RedisServer(persistent=True)``),
  so it can be killed and started again on the same port, as docker compose runs it. That port and
  the storage's are below the kernel's ephemeral range (``steady_port``): on a machine shared with
  other test runs, a port given up for a few seconds was taken by another process before.
- Storage: moto's S3 endpoint behind ``StorageSwitch``, a TCP proxy that can be stopped (its port
  refuses connections and the open ones are reset) and started again on the same port: the
  storage goes away without losing its data.
- Workers: one per slot, each a host of its own (its own spool and health directory), tiny-wan on
  the diffusers engine, paced (``tests.pacing``) and watched (``bench.chaos_probe``). The last slot
  is behind a network namespace (``tests.netns.BadNetwork``, no added loss or latency) whose link
  can be cut and healed.
- The orchestrator: a thread that starts a new worker in any slot whose worker exited (killed, or
  stopped by SIGTERM), as Kubernetes would start a new pod. Every worker it ever ran is an
  ``Incarnation`` with its log, start, exit and metrics address, for the checker.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from renderfarm.localstack import RedisServer, S3Server, WorkerProcess, free_port, relay

__all__ = ["Farm", "Incarnation", "StorageSwitch", "LEASE", "BUCKET", "steady_port"]

# Short leases, as the reliability tests use: a dead node's task moves on within seconds.
LEASE = {"VISIBILITY_TIMEOUT_S": "6", "LEASE_RENEW_S": "2"}
BUCKET = "chaos"


def steady_port() -> int:
    """A free loopback port below the kernel's ephemeral range: no other process's ``bind(0)`` or
    outgoing connection takes it while a server that listens there is down (Redis, the storage)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port below {low}")


class StorageSwitch:
    """A TCP proxy on a fixed loopback port in front of the S3 endpoint; ``stop()`` and ``start()``."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self.port = steady_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._server: socket.socket | None = None
        self.start()

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        relay(source, target)
        with self._lock:
            self._open -= {source, target}

    def stop(self) -> None:
        """Refuse new connections and reset the open ones (a storage server that went away)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()


@dataclass
class Incarnation:
    """One worker process the soak ran: slot, log, life and where its metrics are served."""

    name: str
    slot: str
    log_path: Path
    metrics: str  # host:port
    started: float
    process: WorkerProcess = field(repr=False)
    ready: float | None = None
    exited: float | None = None
    exit_code: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "slot": self.slot, "log": str(self.log_path), "metrics": self.metrics,
                "started": self.started, "ready": self.ready, "exited": self.exited, "exit_code": self.exit_code}  # fmt: skip


class Farm:
    """Redis, switched storage and ``workers`` worker slots (the last one in a network namespace)."""

    def __init__(self, workdir: Path, model_cache: Path, checkpoint_every_s: float, workers: int = 3) -> None:
        from tests.netns import BadNetwork

        self.workdir = workdir
        self._services = contextlib.ExitStack()  # stopped in reverse order, also if one fails to start
        try:
            (workdir / "redis").mkdir(parents=True, exist_ok=True)
            self.redis = RedisServer(workdir / "redis", port=steady_port(), persistent=True)
            self._services.callback(self.redis.stop)
            self.s3 = S3Server()
            self._services.callback(self.s3.stop)
            self.storage = StorageSwitch(self.s3.port)
            self._services.callback(self.storage.stop)
            self.network = self._services.enter_context(BadNetwork(loss_percent=0))
            self._redis_far = self.network.proxy(self.redis.port, delay_s=0.0, jitter_s=0.0)
            self._storage_far = self.network.proxy(self.storage.port, delay_s=0.0, jitter_s=0.0)
        except BaseException:
            self._services.close()
            raise
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "REDIS_", "MODEL_", "ENGINE"))}
        env.update(
            REDIS_URL=self.redis.url, MINIO_ENDPOINT=self.storage.endpoint, MINIO_ACCESS_KEY="chaos",
            MINIO_SECRET_KEY="chaos-secret", MINIO_BUCKET=BUCKET, MODEL_ID="tiny-wan", ENGINE="diffusers",
            MODEL_CACHE_DIR=str(model_cache), PYTHONUNBUFFERED="1", WORKER_MAX_TASKS_PER_CHILD="0",
            CHECKPOINT_EVERY_S=str(checkpoint_every_s), CELERY_WORKER_INCLUDE="tests.pacing,bench.chaos_probe",
            PACE_STEP_S="0.1", **LEASE,
        )  # fmt: skip
        self._env = env
        self.slots = [f"w{i}" for i in range(1, workers)] + ["net"]
        self.current: dict[str, Incarnation] = {}
        self.incarnations: list[Incarnation] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._orchestrator: threading.Thread | None = None

    # --- workers ----------------------------------------------------------------------------

    def _start(self, slot: str) -> Incarnation:
        number = sum(1 for i in self.incarnations if i.slot == slot) + 1
        name = f"chaos-{slot}-{number}"
        port = free_port()
        env = {**self._env, "SPOOL_DIR": str(self.workdir / slot / "spool"),
               "HEALTH_DIR": str(self.workdir / slot / "health"), "METRICS_PORT": str(port)}  # fmt: skip
        wrap: tuple[str, ...] = ()
        metrics = f"127.0.0.1:{port}"
        if slot == "net":  # another host: Redis and storage across the namespace's link
            wrap = self.network.wrap
            env.update(REDIS_URL=f"redis://{self._redis_far.address}/0", MINIO_ENDPOINT=self._storage_far.address,
                       METRICS_ADDR="0.0.0.0")  # fmt: skip
            metrics = f"{self.network.ns_ip}:{port}"
        process = WorkerProcess(name, env, self.workdir / f"{name}.log", ("--without-mingle", "--without-gossip"),
                                wrap=wrap)  # fmt: skip
        incarnation = Incarnation(name, slot, process.log_path, metrics, time.time(), process)
        with self._lock:
            self.incarnations.append(incarnation)
            self.current[slot] = incarnation
        return incarnation

    def start(self, timeout_s: float = 300) -> None:
        """Start every slot's worker, wait until all are ready, then keep them running."""
        for slot in self.slots:
            self._start(slot)
        for incarnation in list(self.current.values()):
            incarnation.process.wait_ready(timeout_s)
            incarnation.ready = time.time()
        self._orchestrator = threading.Thread(target=self._orchestrate, name="chaos-orchestrator", daemon=True)
        self._orchestrator.start()

    def _orchestrate(self) -> None:
        while not self._stopping.wait(0.25):
            for slot in self.slots:
                incarnation = self.current[slot]
                code = incarnation.process.proc.poll()
                if code is None:
                    if incarnation.ready is None and _ready(incarnation.process):
                        incarnation.ready = time.time()
                    continue
                incarnation.exited, incarnation.exit_code = time.time(), code
                incarnation.process.stop()  # closes its log
                self._start(slot)

    def pool_pid(self, slot: str) -> int | None:
        """The pool process of ``slot``'s current worker, if it has one now."""
        import psutil

        try:
            children = psutil.Process(self.current[slot].process.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        return children[0].pid if children else None

    # --- the end ----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        if self._orchestrator is not None:
            self._orchestrator.join(10)
        with contextlib.suppress(Exception):
            self.network.heal()
        for incarnation in self.incarnations:
            if incarnation.exited is None:
                incarnation.process.stop()
                incarnation.exited, incarnation.exit_code = time.time(), incarnation.process.proc.returncode
        self._services.close()


def _ready(process: WorkerProcess) -> bool:
    try:
        return process.is_ready()
    except RuntimeError:  # it exited: the orchestrator replaces it on its next round
        return False
