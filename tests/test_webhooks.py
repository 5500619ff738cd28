"""Webhooks through real workers: a real HTTP receiver on loopback gets signed, retried deliveries."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.errors import InvalidRequest
from tasks.keys import object_key, resolve
from tasks.schemas import Limits, parse_request
from tasks.webhook import WebhookPolicy, check_url, verify
from tests.support import wait_for

SECRET = "test-webhook-secret"
SMALL = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 1}


class Receiver:
    """A real HTTP server on loopback that records each POST; the first ``fail`` answers are 503."""

    def __init__(self, fail: int = 0, status: int = 200) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.fail, self.status = fail, status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
                code = 503 if len(receiver.deliveries) <= receiver.fail else receiver.status
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


def send(producer, kwargs: dict):
    return producer.send_task("tasks.render", kwargs=kwargs, queue="render")


def webhook_worker(start_worker, **env: str):
    return start_worker(**{"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", **env})


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
    time.sleep(1)
    assert len(hook.deliveries) == 1


def test_a_failing_receiver_is_retried_with_backoff_until_it_accepts(start_worker, producer, receiver):
    hook = receiver(fail=2)
    webhook_worker(start_worker, WEBHOOK_RETRY_BACKOFF_S="1")
    result = send(producer, {"prompt": "retry me", "webhook_url": hook.url, **SMALL})
    result.get(timeout=60)
    wait_for(lambda: len(hook.deliveries) >= 3, 60, "three delivery attempts")
    time.sleep(2)
    assert len(hook.deliveries) == 3  # two 503s, then accepted: no more
    payloads = [check_signature(headers, body) for headers, body in hook.deliveries]
    assert [h["x-renderfarm-attempt"] for h, _ in hook.deliveries] == ["1", "2", "3"]
    assert {p["delivery_id"] for p in payloads} == {f"{result.id}:render.succeeded"}


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
        ("http://localhost:8/hook", "resolves to 127.0.0.1, an internal address"),  # a listed name, an unlisted address
    ]:
        result = send(producer, {"prompt": "x", "webhook_url": url, **SMALL})
        with pytest.raises(Exception, match="webhook_url: ") as raised:
            result.get(timeout=60)
        assert type(raised.value).__name__ == "InvalidRequest" and message in str(raised.value), raised.value
    time.sleep(1)
    assert worker.log.count("no webhook for") == 3 and "webhook render.failed queued" not in worker.log


def limits(allowed: str, secret: str | None = SECRET) -> Limits:
    return Limits(max_prompt_chars=100, max_pixel_frames=10**9, models=("tiny-wan",),
                  webhooks=WebhookPolicy.parse(allowed, secret))  # fmt: skip


@pytest.mark.parametrize(
    ("url", "allowed", "message"),
    [
        ("http://127.0.0.1:9/h", "", "not allowed"),
        ("http://127.0.0.1:9/h", "127.0.0.1", None),
        ("http://10.1.2.3/h", "10.0.0.0/8", None),
        ("http://10.1.2.3/h", "*.example.com", "not allowed"),
        ("http://[::1]:9/h", "localhost", "not allowed"),
        ("http://[::1]:9/h", "::1", None),
        ("http://user:pw@127.0.0.1/h", "127.0.0.1", "credentials"),
        ("ftp://127.0.0.1/h", "127.0.0.1", "http"),
        ("http://127.0.0.1/h#frag", "127.0.0.1", "fragment"),
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


def test_webhooks_are_refused_without_a_secret():
    with pytest.raises(InvalidRequest, match="WEBHOOK_SECRET is not set"):
        resolve(parse_request({"prompt": "x", "webhook_url": "http://127.0.0.1/h"}), "tiny-wan", "t",
                limits("127.0.0.1", None))  # fmt: skip
    with pytest.raises(ValueError, match="not allowed"):
        check_url("https://hooks.example.com/x", WebhookPolicy.parse("*.example.org", "s"), resolve=False)


def test_a_separate_webhook_queue_is_served_by_a_light_threads_worker(start_worker, producer, receiver):
    hook = receiver()
    env = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "WEBHOOK_QUEUE": "webhooks"}
    renderer = start_worker(**env)
    notifier = start_worker(wait=False, args=("-Q", "webhooks", "--pool=threads", "--concurrency=4"), **env)
    wait_for(lambda: " ready." in notifier.log, 60, "the webhook worker")
    result = send(producer, {"prompt": "elsewhere", "webhook_url": hook.url, **SMALL})
    result.get(timeout=60)
    wait_for(lambda: hook.deliveries, 30, "the webhook")
    assert check_signature(*hook.deliveries[0])["event"] == "render.succeeded"
    assert "tasks.deliver_webhook[" in notifier.log and "engine loaded" not in notifier.log  # no model there
    assert "deliver_webhook[" not in renderer.log


def test_buffer_mode_posts_once_the_background_upload_stored_the_video(start_worker, producer, receiver):
    hook = receiver()
    webhook_worker(start_worker, WORKER_MODE="buffer")
    result = send(producer, {"prompt": "buffered", "seed": 8, "webhook_url": hook.url, **SMALL})
    value = result.get(timeout=60)
    wait_for(lambda: hook.deliveries, 30, "the webhook")
    payload = check_signature(*hook.deliveries[0])
    assert payload["event"] == "render.succeeded" and payload["result"]["key"] == value["key"]
    assert "uploading" in payload["result"]["timings"]  # sent after the upload, not at hand-over
