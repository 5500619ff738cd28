"""Test-only: a worker on a bad network, on this machine only.

``BadNetwork`` makes a network namespace joined to this one by a veth pair (10.213.N.1 here,
10.213.N.2 there) and puts Redis and S3 behind ``LatencyProxy``s listening on this side's address,
so the worker in the namespace reaches them only across the veth. Packets leaving and entering
the namespace are dropped at random (``loss_percent``, an nftables rule inside the namespace);
``cut()`` takes the link down (a partition: nothing passes, no connection is reset), ``heal()``
brings it back.

``LoopbackOnly`` is a namespace with nothing but ``lo``: no route anywhere (an air-gapped node, a
locked-down pod); what runs there starts its own servers on loopback.

Latency: ``tc netem`` is the natural tool, but kernels built without ``CONFIG_NET_SCH_NETEM``
(this machine's and CI's) refuse it, so each proxy delays what it forwards by ``delay_s`` plus or
minus ``jitter_s``, in order, both ways. Needs root (``ip netns``, ``nft``); ``available()`` says
why not where it cannot run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import random
import shutil
import socket
import subprocess
import threading
import time
from typing import Any

__all__ = ["BadNetwork", "LatencyProxy", "LoopbackOnly", "available"]

_ids = itertools.count(os.getpid() % 200)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def available(tools: tuple[str, ...] = ("ip", "nft")) -> str | None:
    """None when a namespace with a veth pair and nftables (``tools``) can be made here; otherwise why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, nftables): CI runs it as root"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"needs `{tool}` (make install installs iproute2 and nftables)"
    name = f"rf-probe-{os.getpid()}"
    try:
        _run("ip", "netns", "add", name)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace here: {exc.stderr.strip()}"
    with contextlib.suppress(subprocess.CalledProcessError):
        _run("ip", "netns", "del", name)
    return None


class LatencyProxy:
    """A TCP proxy on ``listen_host`` to ``127.0.0.1:upstream_port`` that delays every chunk, in order."""

    def __init__(self, listen_host: str, upstream_port: int, delay_s: float, jitter_s: float) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._delay, self._jitter = delay_s, jitter_s
        self._server = socket.create_server((listen_host, 0))
        self.port = int(self._server.getsockname()[1])
        self.address = f"{listen_host}:{self.port}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(target=self._read, args=(source, chunks), daemon=True).start()
                threading.Thread(target=self._write, args=(chunks, target), daemon=True).start()

    def _read(self, source: socket.socket, chunks: queue.Queue[tuple[float, bytes]]) -> None:
        due = 0.0
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                due = max(due, time.monotonic() + self._delay + random.uniform(-self._jitter, self._jitter))
                chunks.put((due, data))
        chunks.put((due, b""))

    @staticmethod
    def _write(chunks: queue.Queue[tuple[float, bytes]], target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    target.shutdown(socket.SHUT_WR)
                    return
                target.sendall(data)

    def close(self) -> None:
        self._server.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


class BadNetwork:
    """A namespace for one worker, its veth link, packet loss, and proxies to local services."""

    def __init__(self, loss_percent: int = 1) -> None:
        n = next(_ids)
        self.name = f"rf-{os.getpid()}-{n}"
        self._host_link, self._ns_link = f"rfh{os.getpid() % 10000}x{n}", f"rfn{os.getpid() % 10000}x{n}"
        self.host_ip, self.ns_ip = f"10.213.{n}.1", f"10.213.{n}.2"
        self._loss = loss_percent
        self._proxies: list[LatencyProxy] = []

    def __enter__(self) -> BadNetwork:
        ns = ("ip", "netns", "exec", self.name)
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self._host_link, "type", "veth", "peer", "name", self._ns_link)
        _run("ip", "link", "set", self._ns_link, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self._host_link)
        _run("ip", "link", "set", self._host_link, "up")
        _run(*ns, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self._ns_link)
        _run(*ns, "ip", "link", "set", self._ns_link, "up")
        _run(*ns, "ip", "link", "set", "lo", "up")
        if self._loss:
            _run(*ns, "nft", "add", "table", "inet", "renderfarm_loss")
            for chain, hook in (("out", "output"), ("in", "input")):
                _run(*ns, "nft", "add", "chain", "inet", "renderfarm_loss", chain,
                     f"{{ type filter hook {hook} priority 0; }}")  # fmt: skip
                _run(*ns, "nft", "add", "rule", "inet", "renderfarm_loss", chain,
                     "iifname" if hook == "input" else "oifname", self._ns_link,
                     "numgen", "random", "mod", "100", "<", str(self._loss), "drop")  # fmt: skip
        return self

    def proxy(self, upstream_port: int, delay_s: float = 0.15, jitter_s: float = 0.03) -> LatencyProxy:
        """A latency proxy on this side of the link to ``127.0.0.1:upstream_port``."""
        proxy = LatencyProxy(self.host_ip, upstream_port, delay_s, jitter_s)
        self._proxies.append(proxy)
        return proxy

    @property
    def wrap(self) -> tuple[str, ...]:
        """Prefix a command with this to run it inside the namespace."""
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        _run("ip", "link", "set", self._host_link, "down")

    def heal(self) -> None:
        _run("ip", "link", "set", self._host_link, "up")

    def __exit__(self, *exc: Any) -> None:
        for proxy in self._proxies:
            proxy.close()
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("ip", "link", "del", self._host_link)
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("ip", "netns", "del", self.name)


class LoopbackOnly:
    """A network namespace with only ``lo``, up: no default route, no other interface."""

    def __init__(self) -> None:
        self.name = f"rf-lo-{os.getpid()}-{next(_ids)}"

    def __enter__(self) -> LoopbackOnly:
        _run("ip", "netns", "add", self.name)
        _run(*self.wrap, "ip", "link", "set", "lo", "up")
        return self

    @property
    def wrap(self) -> tuple[str, ...]:
        """Prefix a command with this to run it inside the namespace."""
        return ("ip", "netns", "exec", self.name)

    def links(self) -> list[str]:
        """The namespace's interfaces, by name."""
        out = subprocess.run([*self.wrap, "ip", "-o", "link"], check=True, capture_output=True, text=True).stdout
        return [line.split(":")[1].strip() for line in out.splitlines()]

    def routes(self) -> list[str]:
        """Its IPv4 and IPv6 routes (loopback's own only)."""
        return [
            line
            for family in ("-4", "-6")
            for line in subprocess.run(
                [*self.wrap, "ip", family, "route", "show", "table", "main"], check=True, capture_output=True, text=True
            ).stdout.splitlines()
        ]

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("ip", "netns", "del", self.name)
