"""Test helpers on top of ``renderfarm.localstack``: real servers and real worker processes."""

from __future__ import annotations

import psutil

from renderfarm.localstack import ROOT, RedisServer, S3Server, WorkerProcess, free_port, wait_for

__all__ = ["ROOT", "RedisServer", "S3Server", "TestWorker", "free_port", "minio_client", "wait_for"]


def minio_client(server: S3Server):
    from minio import Minio

    return Minio(server.endpoint, access_key="test-access", secret_key="test-secret", secure=False, region="us-east-1")


class TestWorker(WorkerProcess):
    """A worker with process inspection for the tests."""

    __test__ = False

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


class SlowUploadProxy:
    """A TCP proxy in front of the S3 endpoint that holds every PUT request for ``delay_s``.

    Makes uploads take real time on loopback, so that overlapping them with renders is visible.
    """

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        import socket
        import threading

        self.delay_s = delay_s
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
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source, target, to_server: bool) -> None:
        import time

        try:
            while data := source.recv(65536):
                if to_server and data.startswith(b"PUT "):
                    time.sleep(self.delay_s)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.close()
                except OSError:
                    pass

    def stop(self) -> None:
        self._closed.set()
        self._server.close()
