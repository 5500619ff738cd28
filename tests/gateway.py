"""Test helpers for the videos API: `renderfarm api` as a real subprocess, and clients for it.

``start_gateway(env, folder)`` starts the gateway with two keys (alice, bob) and waits until it
answers; ``Gateway.raw`` speaks plain HTTP (http.client), ``Gateway.client`` the official SDK,
``Gateway.socket`` a bare TCP connection for what no HTTP client sends (half a request).
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from renderfarm.api.keys import new_key
from tests.support import ROOT, free_port, wait_for

__all__ = ["Gateway", "start_gateway", "read_to_close", "bytes_waiting_in"]


class Gateway:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, keys: dict[str, str], log: Path) -> None:
        self.proc, self.port, self.keys, self.log = proc, port, keys, log
        self.base = f"http://127.0.0.1:{port}/v1"
        self.clients: list[Any] = []  # closed when the gateway stops: their pooled connections too

    def client(self, owner: str = "alice") -> Any:
        from openai import OpenAI

        self.clients.append(OpenAI(api_key=self.keys[owner], base_url=self.base, max_retries=0, timeout=60))
        return self.clients[-1]

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            owner: str | None = "alice", root: str = "/v1") -> tuple[int, dict[str, str], Any]:  # fmt: skip
        """(status, headers with lower-case names, the parsed JSON body or the raw bytes); ``path`` after ``root``."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = {"Content-Type": "application/json", **(headers or {})}
        if owner:
            sent["Authorization"] = f"Bearer {self.keys[owner]}"
        connection.request(method, root + path, body=body, headers=sent)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        parsed = (
            json.loads(data) if data and response.getheader("content-type", "").startswith("application/json") else data
        )
        return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed

    def create(self, body: dict[str, Any], owner: str = "alice") -> tuple[int, dict[str, str], Any]:
        return self.raw("POST", "/videos", json.dumps(body).encode(), owner=owner)

    def socket(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=60)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.proc.terminate()
        self.proc.wait(20)


def start_gateway(env: dict[str, str], folder: Path, **overrides: str) -> Gateway:
    """`renderfarm api` on a free port with two keys (alice, bob), ``env`` and ``overrides`` (DEFAULT_MODEL
    tiny-wan unless given), its log in ``folder``; returned once it answers."""
    keys, lines = {}, ["# test keys"]
    for owner in ("alice", "bob"):
        keys[owner], line = new_key(owner)
        lines.append(line)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob("keys*")))
    (folder / f"keys{n}").write_text("\n".join(lines) + "\n")
    port = free_port()
    full = {**env, "API_KEYS_FILE": str(folder / f"keys{n}"), "DEFAULT_MODEL": "tiny-wan", **overrides}
    log_path = folder / f"api{n}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "renderfarm.cli", "api", "--port", str(port)], cwd=ROOT,
                                env=full, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    server = Gateway(proc, port, keys, log_path)

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"renderfarm api exited with {proc.returncode}:\n{server.log_text()[-3000:]}")
        try:
            return server.raw("GET", "/videos", owner=None)[0] == 401
        except OSError:
            return False

    wait_for(answers, 60, "the API to answer")
    return server


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def bytes_waiting_in(port: int) -> int:
    """Bytes that clients sent to the server on loopback ``port`` and it has not read yet (the
    receive queues of its sockets, accepted or not, from /proc/net/tcp): a command waiting in a
    stopped Redis."""
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                waiting += int(fields[4].split(":")[1], 16)
    return waiting
