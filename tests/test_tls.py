"""Redis over TLS only (issue 16): `rediss://...?ssl_cert_reqs=required&ssl_ca_certs=PATH` works for
every component that talks to Redis: producers, a worker (broker, result backend, lease keeper,
metrics), the health probe, `renderfarm doctor` and `renderfarm status`. The test makes its own CA
and certificates (openssl) and a redis-server that listens with TLS only; a plain connection to
that port (``renderfarm doctor``, a worker at start: "speaks TLS", the ``rediss://`` form) and a
certificate from another CA are refused with a clear error.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from renderfarm.localstack import free_port, relay, wait_for
from tests.support import PACED, ROOT, videos_in
from tests.test_flower import running_flower
from tests.test_monitoring import scrape, value
from worker_config.celery_config import app_config
from worker_config.settings import BrokerSettings


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", f"/CN={name}"], check=True, capture_output=True)  # fmt: skip
    return key, cert


def make_server_cert(directory: Path, ca_key: Path, ca_cert: Path) -> tuple[Path, Path]:
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(directory / "san.cnf")],
                   check=True, capture_output=True)  # fmt: skip
    return key, cert


class TlsRedis:
    def __init__(self, directory: Path) -> None:
        ca_key, self.ca = make_ca(directory, "farm-ca")
        key, cert = make_server_cert(directory, ca_key, self.ca)
        _, self.other_ca = make_ca(directory, "other-ca")
        self.port = free_port()
        self._proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.ca),
             "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = self.url_with(self.ca)
        import redis

        wait_for(lambda: _pings(redis.Redis.from_url(self.url)), 15, "redis-server to answer over TLS")

    def url_with(self, ca: Path) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path)
    yield server
    server.stop()


class TlsProxy:
    """TLS in front of a plain local endpoint (the test S3 server): what a private-CA HTTPS S3 looks like."""

    def __init__(self, upstream_port: int, key: Path, cert: Path) -> None:
        import socket
        import ssl
        import threading

        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(cert), str(key))
        self._upstream = ("127.0.0.1", upstream_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                raw, _ = self._server.accept()
                client = self._context.wrap_socket(raw, server_side=True)
            except OSError:  # closed, or a client that refused our certificate
                if self._server.fileno() == -1:
                    return
                continue
            upstream = socket.create_connection(self._upstream)
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=relay, args=(source, target), daemon=True).start()

    def close(self) -> None:
        self._server.close()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "renderfarm.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_every_component_works_over_tls_and_nothing_else_gets_in(tls_redis: TlsRedis, start_worker, worker_env, s3,
                                                                 tmp_path: Path):  # fmt: skip
    port = free_port()
    worker = start_worker(REDIS_URL=tls_redis.url, METRICS_PORT=str(port), METRICS_ADDR="127.0.0.1",
                          VISIBILITY_TIMEOUT_S="6", LEASE_RENEW_S="1", **PACED)  # fmt: skip
    producer = Celery("producer")
    producer.conf.update(app_config(BrokerSettings(REDIS_URL=tls_redis.url)))
    try:
        # 40 paced steps: 4 s or more, four lease renewals over TLS at least.
        result = producer.send_task("tasks.render", kwargs={"prompt": "over TLS", "seed": 1, "num_inference_steps": 40},
                                    queue="render")  # fmt: skip
        done = result.get(timeout=120)
        assert done["worker"] == worker.hostname and done["seed"] == 1
    finally:
        producer.close()
    wait_for(lambda: value(scrape(port), "renderfarm_broker_up") == 1, 30, "the metrics to read Redis over TLS")
    assert "could not renew task leases" not in worker.log  # the lease keeper renewed over TLS (else: a warning each)

    env = {**worker_env, "REDIS_URL": tls_redis.url}
    doctor = cli(env, "doctor", "--producer")
    assert "Redis at REDIS_URL does not answer" not in doctor.stdout + doctor.stderr, doctor.stdout
    status = cli(env, "status", result.id)
    assert status.returncode == 0 and '"state": "SUCCESS"' in status.stdout, status.stderr
    probe = subprocess.run([sys.executable, "-m", "tasks.worker.healthcheck", "--name", worker.name, "--timeout", "10"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert probe.returncode == 0, probe.stderr

    # Flower over TLS: its workers, the queue's length (its own Redis client) and a render's result.
    with running_flower(env, tmp_path) as flower:
        wait_for(lambda: worker.hostname in flower.json("/api/workers?refresh=1"), 60, "Flower to list the worker")
        queues = flower.json("/api/queues/length")
        assert [q["name"] for q in queues["active_queues"]] == ["render", "render.tiny-wan"], queues
        assert flower.json(f"/api/task/result/{result.id}")["state"] == "SUCCESS"

    # A plain connection to the TLS port: refused, and named as such with the rediss:// form, by doctor
    # and by a worker at start (which exits: it could never connect); another CA: refused.
    plain_url = f"redis://127.0.0.1:{tls_redis.port}/0"
    plain = cli({**env, "REDIS_URL": plain_url}, "doctor", "--producer")
    lines = plain.stderr.splitlines()
    assert plain.returncode == 1 and lines[0] == (
        f"FAIL broker: Redis at REDIS_URL ({plain_url}) speaks TLS (it answered a TLS handshake) and REDIS_URL is a "
        "plain redis:// URL: the server resets plain connections"
    ), plain.stderr
    rediss = f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_cert_reqs=required&ssl_ca_certs=/path/to/ca.crt"
    assert lines[1].strip() == f"fix: use rediss:// with the CA that signed the server's certificate: {rediss}"
    refused = start_worker(wait=False, REDIS_URL=plain_url)
    assert refused.proc.wait(60) == 2
    assert f"renderfarm worker: FATAL: Redis at REDIS_URL ({plain_url}) speaks TLS" in refused.log
    assert rediss in refused.log and "engine loaded" not in refused.log
    other = cli({**env, "REDIS_URL": tls_redis.url_with(tls_redis.other_ca)}, "doctor", "--producer")
    assert other.returncode != 0 and "certificate verify failed" in other.stdout + other.stderr


def test_storage_over_https_with_a_private_ca(start_worker, worker_env, producer: Celery, s3_server, s3, bucket,
                                              tmp_path: Path):  # fmt: skip
    ca_key, ca = make_ca(tmp_path, "storage-ca")
    key, cert = make_server_cert(tmp_path, ca_key, ca)
    _, other_ca = make_ca(tmp_path, "other-ca")
    proxy = TlsProxy(s3_server.port, key, cert)
    https = {"MINIO_ENDPOINT": f"https://127.0.0.1:{proxy.port}", "MINIO_CA_BUNDLE": str(ca)}
    try:
        worker = start_worker(**https)
        done = producer.send_task("tasks.render", kwargs={"prompt": "stored over https", "seed": 2},
                                  queue="render").get(timeout=120)  # fmt: skip
        assert done["worker"] == worker.hostname
        assert [o.object_name for o in videos_in(s3, bucket)] == [done["key"]]

        env = {**worker_env, **https}
        ok = cli(env, "doctor", "--producer")
        assert ok.returncode == 0 and "ok   storage" in ok.stderr, ok.stderr
        for refused in ({"MINIO_CA_BUNDLE": str(other_ca)}, {"MINIO_CA_BUNDLE": ""}):  # another CA; the public CAs
            out = cli({**env, **refused}, "doctor", "--producer")
            assert out.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in out.stderr, out.stderr
    finally:
        proxy.close()
