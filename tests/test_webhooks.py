"""Webhooks through real workers: a real HTTP receiver on loopback gets signed, retried deliveries."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.errors import InvalidRequest
from tasks.keys import object_key, resolve

# Imported before any in-process app exists: tasks.deliver_webhook is a shared task, so each such app has it.
from tasks.pipeline.webhook_delivery import WebhookFailed, WebhookRejected
from tasks.schemas import Limits, parse_request
from tasks.webhook import WebhookPolicy, check_url, verify
from tests.support import ROOT, TestWorker, free_port, wait_for, watch_events
from tests.test_monitoring import scrape, value

SECRET = "test-webhook-secret"
SMALL = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 1}


class Receiver:
    """A real HTTP server on loopback that records each POST; the first ``fail`` answers are ``fail_status``."""

    def __init__(self, fail: int = 0, status: int = 200, fail_status: int = 503) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.fail, self.status, self.fail_status = fail, status, fail_status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
                code = receiver.fail_status if len(receiver.deliveries) <= receiver.fail else receiver.status
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/render?source=test"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "renderfarm.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def send(producer, kwargs: dict):
    return producer.send_task("tasks.render", kwargs=kwargs, queue="render")


def webhook_worker(start_worker, **env: str):
    # The receivers listen on random ports: "127.0.0.1:*" opens them all (a bare host opens 80 and 443 only).
    return start_worker(**{"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1:*", **env})


def check_signature(headers: dict[str, str], body: bytes) -> dict:
    """What a receiver does, written out: HMAC-SHA256 of the raw body with the shared secret."""
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-renderfarm-signature"], expected)
    payload = json.loads(body)
    assert headers["x-renderfarm-timestamp"] == str(payload["timestamp"])
    assert abs(time.time() - payload["timestamp"]) < 120
    assert verify(body, headers["x-renderfarm-signature"], headers["x-renderfarm-timestamp"], SECRET) == payload
    with pytest.raises(ValueError, match="bad signature"):
        verify(body + b" ", headers["x-renderfarm-signature"], headers["x-renderfarm-timestamp"], SECRET)
    return payload


def test_success_posts_the_signed_result_and_the_url_does_not_change_the_key(start_worker, producer, receiver):
    hook = receiver()
    webhook_worker(start_worker)
    result = send(producer, {"prompt": "hooked", "seed": 4, "webhook_url": hook.url, **SMALL})
    value = result.get(timeout=60)
    wait_for(lambda: hook.deliveries, 30, "the webhook")
    headers, body = hook.deliveries[0]
    payload = check_signature(headers, body)
    assert payload["event"] == "render.succeeded" and payload["state"] == "SUCCESS"
    assert payload["task_id"] == result.id and payload["delivery_id"] == f"{result.id}:render.succeeded"
    assert payload["result"]["key"] == value["key"] and payload["error"] is None
    assert headers["x-renderfarm-event"] == "render.succeeded" and headers["x-renderfarm-attempt"] == "1"
    # The same request without a webhook is the same video: served from storage under the same key.
    plain = send(producer, {"prompt": "hooked", "seed": 4, **SMALL}).get(timeout=60)
    assert plain["cached"] is True and plain["key"] == value["key"]
    # A barrier: deliveries run on the render queue at the top priority, so one queued for either
    # render would have run before this next render did.
    send(producer, {"prompt": "barrier", **SMALL}).get(timeout=60)
    assert len(hook.deliveries) == 1


def test_a_failed_render_posts_its_error(start_worker, producer, receiver):
    hook = receiver()
    webhook_worker(start_worker)
    result = send(producer, {"prompt": "bad", "num_frames": 8, "webhook_url": hook.url})
    with pytest.raises(Exception, match="num_frames"):
        result.get(timeout=60)
    wait_for(lambda: hook.deliveries, 30, "the webhook")
    payload = check_signature(*hook.deliveries[0])
    assert payload["event"] == "render.failed" and payload["state"] == "FAILURE" and payload["result"] is None
    assert payload["error"]["type"] == "InvalidRequest" and "num_frames" in payload["error"]["message"]


def test_a_disallowed_webhook_is_rejected_before_any_render(start_worker, producer):
    worker = webhook_worker(start_worker, WEBHOOK_ALLOWED_HOSTS="localhost,127.0.0.2")
    for url, message in [
        ("http://evil.example.com/hook", "host 'evil.example.com' is not allowed"),
        ("http://169.254.169.254/latest/meta-data", "host '169.254.169.254' is not allowed"),
        ("http://localhost:8/hook", "port 8 of host 'localhost' is not allowed"),  # a listed name, another port
    ]:
        result = send(producer, {"prompt": "x", "webhook_url": url, **SMALL})
        with pytest.raises(Exception, match="webhook_url: ") as raised:
            result.get(timeout=60)
        assert type(raised.value).__name__ == "InvalidRequest" and message in str(raised.value), raised.value
        assert str(raised.value).startswith("invalid render request: webhook_url: ")
    wait_for(lambda: worker.log.count("no webhook for") == 3, 30, "each refusal to be logged")
    assert "webhook render.failed queued" not in worker.log


def test_a_listed_name_that_resolves_inside_is_refused_at_delivery_not_at_submit(start_worker, producer, receiver):
    hook = receiver()
    worker = webhook_worker(start_worker, WEBHOOK_ALLOWED_HOSTS="localhost:*")  # the name, not the address
    url = hook.url.replace("127.0.0.1", "localhost")
    result = send(producer, {"prompt": "x", "webhook_url": url, **SMALL})
    assert result.get(timeout=60)["key"]  # no DNS lookup at submit: the render ran
    wait_for(lambda: "resolves to 127.0.0.1, an internal address" in worker.log, 60, "the delivery's refusal")
    assert hook.deliveries == [] and "WebhookRejected" in worker.log


def test_a_host_that_does_not_resolve_yet_is_retried_at_delivery_and_its_token_never_shows(
    start_worker, producer, redis_server
):
    token = "tok-5ecret-a1b2"
    worker = webhook_worker(
        start_worker, WEBHOOK_ALLOWED_HOSTS="hooks.invalid", WEBHOOK_RETRY_BACKOFF_S="1", WEBHOOK_MAX_RETRIES="2"
    )
    url = f"https://hooks.invalid/render?token={token}"  # .invalid never resolves (RFC 6761)
    received: list[dict] = []
    with watch_events(producer, {"task-received": received.append}):
        result = send(producer, {"prompt": "x", "webhook_url": url, **SMALL})
        assert result.get(timeout=60)["key"]  # accepted: an allow-listed name need not resolve at submit
        wait_for(lambda: "raised unexpected: WebhookFailed" in worker.log, 90, "the delivery to give up")
    assert worker.log.count("tasks.deliver_webhook[") >= 3 and worker.log.count("Retry in") == 2  # 1 + 2 retries
    assert "host 'hooks.invalid' does not resolve" in worker.log
    assert "https://hooks.invalid/render?..." in worker.log and token not in worker.log
    # What the worker sends shows the URL redacted: each delivery attempt (the render itself came from a
    # producer that does not use this project: its arguments are shown as that producer sent them).
    shown = [e["kwargs"] for e in received if e.get("name") == "tasks.deliver_webhook"]
    assert len(shown) == 3 and all(token not in text and "hooks.invalid/render?..." in text for text in shown), shown
    # Nor do the states stored in Redis (the render's and each delivery's): no task's arguments are kept there.
    stored = [redis_server.client.get(key) for key in redis_server.client.keys("celery-task-meta-*")]
    assert len(stored) >= 2 and not any(token.encode() in value for value in stored)
    assert producer.AsyncResult(result.id).state == "SUCCESS"  # the delivery failed, the render's outcome stands


def limits(allowed: str, secret: str | None = SECRET) -> Limits:
    return Limits(max_prompt_chars=100, max_pixel_frames=10**9, models=("tiny-wan",),
                  webhooks=WebhookPolicy.parse(allowed, secret))  # fmt: skip


@pytest.mark.parametrize(
    ("url", "allowed", "message"),
    [
        ("http://127.0.0.1:9/h", "", "not allowed"),
        ("http://127.0.0.1:9/h", "127.0.0.1:9", None),
        ("http://127.0.0.1:9/h", "127.0.0.1", "port 9 of host '127.0.0.1' is not allowed"),
        ("http://127.0.0.1:9/h", "127.0.0.1:*", None),
        ("https://127.0.0.1/h", "127.0.0.1", None),  # 443, and 80, are open for any listed host
        ("http://10.1.2.3/h", "10.0.0.0/8", None),
        ("http://10.1.2.3:8080/h", "10.0.0.0/8:8080", None),
        ("http://10.1.2.3/h", "*.example.com", "not allowed"),
        ("http://[::1]:9/h", "localhost", "not allowed"),
        ("http://[::1]:9/h", "[::1]:9", None),
        ("http://[::1]/h", "::1", None),
        ("http://user:pw@127.0.0.1/h", "127.0.0.1", "credentials"),
        ("ftp://127.0.0.1/h", "127.0.0.1", "http"),
        ("http://127.0.0.1/h#frag", "127.0.0.1", "fragment"),
        # Public-looking IPv6 addresses that carry an internal IPv4 one are refused unless listed by IP.
        ("http://[64:ff9b::7f00:1]/h", "*.example.com,64:ff9b::/96", None),
        ("http://[64:ff9b::a00:1]/h", "[64:ff9b::a00:1]", None),
        ("http://100.64.0.1/h", "100.64.0.1", None),
    ],
)
def test_webhook_url_policy(url, allowed, message):
    request = parse_request({"prompt": "x", "webhook_url": url}) if not url.startswith("ftp") else None
    if request is None:
        with pytest.raises(InvalidRequest, match=message):
            parse_request({"prompt": "x", "webhook_url": url})
        return
    if message is None:
        spec = resolve(request, "tiny-wan", "t", limits(allowed))
        assert "webhook_url" not in spec
        assert object_key(spec) == object_key(resolve(parse_request({"prompt": "x"}), "tiny-wan", "t", limits("")))
    else:
        with pytest.raises(InvalidRequest, match=f"webhook_url: .*{message}"):
            resolve(request, "tiny-wan", "t", limits(allowed))


@pytest.mark.parametrize(
    "address",
    ["64:ff9b::7f00:1", "64:ff9b:1::a00:1", "2002:7f00:1::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
     "::ffff:127.0.0.1", "::127.0.0.1", "100.64.0.1", "fd00::1"],
)  # fmt: skip
def test_a_name_resolving_to_an_address_that_reaches_inside_is_refused(address, monkeypatch):
    import socket

    def resolve_to(host, port, *args, **kwargs):  # a DNS answer, without a DNS server
        return [(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve_to)
    policy = WebhookPolicy.parse("hooks.example.com", SECRET)
    with pytest.raises(
        ValueError,
        match=rf"resolves to {re.escape(str(ipaddress.ip_address(address)))}, an (IPv6 address with an IPv4|internal)",
    ):
        check_url("http://hooks.example.com/h", policy)
    assert check_url(
        "http://hooks.example.com/h", WebhookPolicy.parse(f"hooks.example.com,[{address}]", SECRET)
    ).addresses


def test_webhooks_are_refused_without_a_secret():
    with pytest.raises(InvalidRequest, match="WEBHOOK_SECRET is not set"):
        resolve(parse_request({"prompt": "x", "webhook_url": "http://127.0.0.1/h"}), "tiny-wan", "t",
                limits("127.0.0.1", None))  # fmt: skip
    with pytest.raises(ValueError, match="not allowed"):
        check_url("https://hooks.example.com/x", WebhookPolicy.parse("*.example.org", "s"), resolve=False)


# docs/monitoring.md's webhook worker, exactly as written there, and README's render worker command.
WEBHOOK_WORKER = ["-m", "celery", "-A", "tasks", "worker", "-Q", "webhooks", "--pool=threads", "--concurrency=8",
                  "-n", "webhooks@%h"]  # fmt: skip
RENDER_WORKER = ["-m", "renderfarm.cli", "worker"]


def documented_worker(tmp_path, env: dict[str, str], name: str, argv: list[str]) -> TestWorker:
    """A worker started by its documented command line (``name`` is its node name before '@')."""
    return TestWorker(name, env, tmp_path / f"{name}.log", command=[sys.executable, *argv])


def answers(producer, worker: TestWorker) -> bool:
    """The worker answers a ping (the webhook worker logs at WARNING: no "ready" line to wait for)."""
    if worker.proc.poll() is not None:
        raise RuntimeError(f"worker {worker.name} exited with {worker.proc.returncode}:\n{worker.log[-3000:]}")
    return bool(producer.control.ping(destination=[worker.hostname], timeout=0.5))


def consumed(producer, worker: TestWorker) -> list[str]:
    """The queues ``worker`` consumes now, as Celery reports them (what Flower's worker page shows)."""
    replies = producer.control.inspect(destination=[worker.hostname], timeout=2).active_queues() or {}
    return sorted(q["name"] for q in replies.get(worker.hostname, []))


def test_the_documented_webhook_worker_takes_no_render_and_delivers(worker_env, producer, receiver, tmp_path):
    """issue 25.1: it used to consume `render` and `render.<model>` too and failed renders with EngineNotReady."""
    hook = receiver()
    env = {**worker_env, "WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1:*", "WEBHOOK_QUEUE": "webhooks"}
    renderer = documented_worker(tmp_path, env, "render-tiny-wan", RENDER_WORKER)  # its default name
    notifier = documented_worker(tmp_path, env, "webhooks", WEBHOOK_WORKER)
    received: list[dict] = []
    try:
        wait_for(lambda: answers(producer, notifier), 60, "the webhook worker to answer")
        renderer.wait_ready()
        assert consumed(producer, notifier) == ["webhooks"]
        assert consumed(producer, renderer) == ["render", "render.tiny-wan", "webhooks"]
        with watch_events(producer, {"task-received": received.append}):
            sent = [send(producer, {"prompt": f"hooked {n}", "seed": n, "webhook_url": hook.url, **SMALL})
                    for n in range(10)]  # fmt: skip
            values = [result.get(timeout=120) for result in sent]
            assert [producer.AsyncResult(r.id).state for r in sent] == ["SUCCESS"] * 10
            wait_for(lambda: len(hook.deliveries) >= 10, 60, "every delivery")
        payloads = [check_signature(headers, body) for headers, body in hook.deliveries]
        assert sorted(p["delivery_id"] for p in payloads) == sorted(f"{r.id}:render.succeeded" for r in sent)
        assert {p["task_id"]: p["result"]["key"] for p in payloads} == {
            r.id: v["key"] for r, v in zip(sent, values, strict=True)
        }
        # Who received what, from the workers' own events: every render by the render worker, none by the other.
        renders = [e["hostname"] for e in received if e.get("name") == "tasks.render"]
        assert renders == [renderer.hostname] * 10, renders
        assert consumed(producer, notifier) == ["webhooks"]
        listed = {w["worker"]: w for w in json.loads(cli(env, "workers", "--json").stdout)}
        assert (listed[notifier.hostname]["queues"], listed[notifier.hostname]["renders"]) == (["webhooks"], False)
        assert listed[notifier.hostname]["model"] is None and listed[renderer.hostname]["model"] == "tiny-wan"
        assert listed[renderer.hostname]["queues"] == ["render", "render.tiny-wan", "webhooks"]
    finally:
        notifier.stop()
        renderer.stop()
    assert "tasks.render" not in notifier.log and "engine" not in notifier.log, notifier.log[-3000:]


def test_a_render_that_reaches_a_worker_without_an_engine_is_given_back_once_and_rendered_elsewhere(
    worker_env, producer, receiver, redis_server, tmp_path
):
    """Defence in depth: a render queue added to the webhook worker at run time (Flower's "add consumer")."""
    hook = receiver()
    metrics = free_port()
    env = {**worker_env, "WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1:*", "WEBHOOK_QUEUE": "webhooks"}
    notifier = documented_worker(tmp_path, {**env, "METRICS_PORT": str(metrics)}, "webhooks", WEBHOOK_WORKER)
    renderer = None
    received: list[dict] = []
    try:
        wait_for(lambda: answers(producer, notifier), 60, "the webhook worker to answer")
        producer.control.add_consumer("render", destination=[notifier.hostname], reply=True)
        wait_for(lambda: consumed(producer, notifier) == ["render", "webhooks"], 30, "the added consumer")
        with watch_events(producer, {"task-received": received.append, "task-rejected": received.append}):
            result = send(producer, {"prompt": "strayed", "seed": 3, "webhook_url": hook.url, **SMALL})
            # Given back, not failed: waiting in its queue again, and the worker stopped taking renders.
            wait_for(lambda: consumed(producer, notifier) == ["webhooks"], 60, "the worker to stop consuming render")
            wait_for(lambda: redis_server.client.llen("render") == 1, 30, "the render back in its queue")
            assert result.state == "PENDING"
            samples = scrape(metrics)
            assert value(samples, "renderfarm_renders_requeued_total", queue="render", reason="no_engine") == 1
            assert value(samples, "renderfarm_renders_total") == 0  # no render outcome counted there
            # A render worker starts: the same render is rendered there, once, and its webhook delivered.
            renderer = documented_worker(tmp_path, env, "render-tiny-wan", RENDER_WORKER).wait_ready()
            assert result.get(timeout=120)["worker"] == renderer.hostname
            wait_for(lambda: hook.deliveries, 60, "the delivery")
        assert check_signature(*hook.deliveries[0])["event"] == "render.succeeded" and len(hook.deliveries) == 1
        seen = [(e["type"], e["hostname"]) for e in received if e.get("uuid") == result.id]
        assert seen == [("task-received", notifier.hostname), ("task-rejected", notifier.hostname),
                        ("task-received", renderer.hostname)], seen  # fmt: skip
        assert value(scrape(metrics), "renderfarm_renders_requeued_total") == 1  # it did not come back there
    finally:
        notifier.stop()
        if renderer is not None:
            renderer.stop()
    assert "no engine is loaded in this process: it is not a render worker" in notifier.log
    assert "webhooks@" in notifier.log and "stops consuming render" in notifier.log
    assert "EngineNotReady" not in notifier.log


def test_a_render_that_keeps_coming_back_to_one_process_waits_longer_each_time():
    """Should a worker without an engine go on taking one render, it is not a hot loop (tasks/pipeline/stray.py)."""
    from tasks.pipeline.stray import MAX_WAIT_S, wait_before_giving_back

    assert [wait_before_giving_back("back-again") for _ in range(8)] == [0, 1, 2, 4, 8, 16, MAX_WAIT_S, MAX_WAIT_S]
    assert wait_before_giving_back("another") == 0  # each render its own count: the first return is immediate


def test_a_worker_whose_pool_cannot_load_an_engine_refuses_render_queues(worker_env):
    """A threads worker with `-Q render`, or with no -Q (Celery's default queue is `render`), would fail renders."""
    for queues in (["-Q", "render,webhooks"], []):
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=threads", *queues, "-n", "t@%h"],
            cwd=ROOT, env=worker_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, (queues, done.stderr[-2000:])
        assert "FATAL: a --pool=threads worker cannot render" in done.stderr and "-Q webhooks" in done.stderr


def test_buffer_mode_posts_once_the_background_upload_stored_the_video(start_worker, producer, receiver):
    hook = receiver()
    webhook_worker(start_worker, WORKER_MODE="buffer")
    result = send(producer, {"prompt": "buffered", "seed": 8, "webhook_url": hook.url, **SMALL})
    value = result.get(timeout=60)
    wait_for(lambda: hook.deliveries, 30, "the webhook")
    payload = check_signature(*hook.deliveries[0])
    assert payload["event"] == "render.succeeded" and payload["result"]["key"] == value["key"]
    assert "uploading" in payload["result"]["timings"]  # sent after the upload, not at hand-over


# ------------------------------------------------------------------------------------------------
# The delivery policy itself: tasks.deliver_webhook as declared, run by a Celery worker in this process
# (pytest-celery's celery_worker) on the real Redis, against real receivers. No render is needed for it.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def deliver(in_process_worker, producer):
    """``deliver(url)``: queue one ``render.succeeded`` delivery as a render worker does (``s9_notify``: top
    priority, the webhook queue, here ``render``); its AsyncResult. The task is this project's own (its
    declaration's retry policy, its body), with the signing secret and allow-list from this process's
    environment."""
    from tasks.pipeline.s9_notify import event_payload
    from worker_config.settings import get_settings

    saved = {name: os.environ.get(name) for name in ("WEBHOOK_SECRET", "WEBHOOK_ALLOWED_HOSTS")}
    os.environ.update(WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOWED_HOSTS="127.0.0.1:*")
    get_settings.cache_clear()
    try:
        worker = in_process_worker({})  # deliver_webhook is a shared task: the in-process app has it
        task = worker.app.tasks["tasks.deliver_webhook"]

        def send_delivery(url: str, max_retries: int | None = None):
            if max_retries is not None:
                task.max_retries = max_retries  # this app's copy of the task only
            payload = event_payload(str(uuid.uuid4()), "render.succeeded", result={"key": "renders/x.mp4"})
            return producer.send_task(task.name, kwargs={"url": url, "payload": payload}, queue="render", priority=0)

        yield send_delivery
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


def test_a_failing_receiver_is_retried_with_backoff_until_it_accepts(deliver, receiver):
    hook = receiver(fail=2)
    assert deliver(hook.url).get(timeout=60) == {"status": 200, "attempts": 3}  # two 503s, then accepted: no more
    assert len(hook.deliveries) == 3
    payloads = [check_signature(headers, body) for headers, body in hook.deliveries]
    assert [h["x-renderfarm-attempt"] for h, _ in hook.deliveries] == ["1", "2", "3"]
    assert len({p["delivery_id"] for p in payloads}) == 1  # receivers deduplicate on it


def test_each_answer_of_a_receiver_ends_or_retries_the_delivery_as_documented(deliver, receiver):
    retried = {code: receiver(fail=1, fail_status=code) for code in (408, 425, 429, 500)}  # then 200
    final = {code: receiver(status=code) for code in (301, 400, 404, 410)}  # said no: never again
    sent = {code: deliver(hook.url) for code, hook in [*retried.items(), *final.items()]}
    for code in retried:
        assert sent[code].get(timeout=60) == {"status": 200, "attempts": 2}, code
    for code in final:
        with pytest.raises(WebhookRejected, match=rf"refused the delivery: HTTP {code} \(not retried\)"):
            sent[code].get(timeout=60)
    assert {code: len(hook.deliveries) for code, hook in [*retried.items(), *final.items()]} == {
        **dict.fromkeys(retried, 2),
        **dict.fromkeys(final, 1),
    }


def test_a_receiver_down_until_the_retries_run_out_fails_the_delivery(deliver, receiver):
    down = f"http://127.0.0.1:{free_port()}/hooks/render"  # nothing listens there
    failing = receiver(fail=99)  # answers 503 every time
    unreachable, refused = deliver(down, max_retries=2), deliver(failing.url, max_retries=2)
    with pytest.raises(WebhookFailed, match="unreachable"):
        unreachable.get(timeout=60)
    with pytest.raises(WebhookFailed, match="answered HTTP 503"):
        refused.get(timeout=60)
    # 1 + 2 retries, then the delivery failed; a render's own outcome stands (a real render and worker:
    # test_a_host_that_does_not_resolve_yet_is_retried_at_delivery_and_its_token_never_shows).
    assert len(failing.deliveries) == 3
