"""Test helpers on top of ``renderfarm.localstack``: real servers and real worker processes."""

from __future__ import annotations

import psutil

from renderfarm.localstack import ROOT, RedisServer, S3Server, SlowUploadProxy, WorkerProcess, free_port, wait_for

__all__ = ["ROOT", "RedisServer", "S3Server", "SlowUploadProxy", "TestWorker", "free_port", "minio_client", "wait_for"]


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
