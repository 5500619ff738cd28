"""Redis with Sentinel on loopback: a master, a replica and three sentinels, real processes.

For the failover test (tests/test_sentinel.py) and its measurement (bench/failover.py). The
sentinels run Debian's redis-server in sentinel mode (``redis-server sentinel.conf --sentinel``);
the master and the replica require a password, and so do the sentinels, as in production. The
sentinels declare the master down after ``down_after_ms`` without an answer and promote the replica.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from renderfarm.localstack import RedisServer, free_port, wait_for

__all__ = ["MASTER_NAME", "SentinelCluster"]

MASTER_NAME = "farm"


class SentinelCluster:
    def __init__(self, workdir: Path, password: str, sentinel_password: str, down_after_ms: int = 1000) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make install` (apt-get install redis-server)")
        self.password, self.sentinel_password = password, sentinel_password
        (workdir / "master").mkdir(parents=True)
        (workdir / "replica").mkdir()
        master = RedisServer(workdir / "master", password=password)
        replica = RedisServer(
            workdir / "replica", password=password, extra=("--replicaof", "127.0.0.1", str(master.port))
        )
        self.servers = {master.port: master, replica.port: replica}
        wait_for(
            lambda: replica.client.info("replication").get("master_link_status") == "up", 30, "the replica to sync"
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._sentinels = []
        for port in self.sentinel_ports:
            directory = workdir / f"sentinel-{port}"
            directory.mkdir()
            conf = directory / "sentinel.conf"  # the sentinel rewrites it with what it learns
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\nrequirepass {sentinel_password}\n"
                f"sentinel sentinel-pass {sentinel_password}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} 2\n"
                f"sentinel auth-pass {MASTER_NAME} {password}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self._sentinels.append(
                subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            )
        wait_for(self._all_agree, 30, "three sentinels to watch the master and know each other and the replica")

    @property
    def url(self) -> str:
        """``REDIS_URL`` for this cluster: every sentinel, the master's password and database."""
        return ";".join(f"sentinel://:{self.password}@127.0.0.1:{port}/0" for port in self.sentinel_ports)

    @property
    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.url, "REDIS_SENTINEL_MASTER": MASTER_NAME,
                "REDIS_SENTINEL_PASSWORD": self.sentinel_password}  # fmt: skip

    def _sentinel(self, port: int):
        import redis

        return redis.Redis(port=port, password=self.sentinel_password, socket_timeout=2, decode_responses=True)

    def master_port(self, sentinel_port: int | None = None) -> int:
        """The master's port as a sentinel reports it."""
        client = self._sentinel(sentinel_port or self.sentinel_ports[0])
        try:
            return int(client.sentinel_get_master_addr_by_name(MASTER_NAME)[1])
        finally:
            client.close()

    def _all_agree(self) -> bool:
        try:
            for port in self.sentinel_ports:
                client = self._sentinel(port)
                try:
                    state = client.sentinel_master(MASTER_NAME)
                finally:
                    client.close()
                if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                    return False
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def kill_master(self) -> int:
        """SIGKILL the current master (a host lost); its port."""
        port = self.master_port()
        self.servers[port].kill()
        return port

    def wait_for_failover(self, old_port: int, timeout: float = 60) -> int:
        """Until every sentinel names a new master that answers as one; its port."""

        def promoted() -> int:
            try:
                ports = {self.master_port(port) for port in self.sentinel_ports}
                if len(ports) != 1 or old_port in ports:
                    return 0
                port = ports.pop()
                role = self.servers[port].client.info("replication").get("role")
                return port if role == "master" else 0
            except Exception:  # noqa: BLE001 - a sentinel or the new master not answering yet
                return 0

        port = wait_for(promoted, timeout, "the sentinels to promote the replica", interval=0.2)
        assert isinstance(port, int)
        return port

    def rejoin(self, port: int, timeout: float = 60) -> None:
        """Start a killed server again: the sentinels make it a replica of the current master."""
        server = self.servers[port]
        server.start()

        def replica_in_sync() -> bool:
            try:
                info = server.client.info("replication")
            except Exception:  # noqa: BLE001 - it drops its clients when the sentinels make it a replica
                return False
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        wait_for(replica_in_sync, timeout, f"the server on port {port} to rejoin as a replica", interval=0.2)
        wait_for(self._all_agree, timeout, "the sentinels to count the replica again", interval=0.2)

    def stop(self) -> None:
        for proc in self._sentinels:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        for server in self.servers.values():
            server.stop()
