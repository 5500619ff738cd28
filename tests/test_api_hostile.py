"""The HTTP gateway under hostile clients (issue 26): no 5xx from input, honest request ids, no
redirect from the Host header, Redis failures as 503s that never freeze the event loop, and slow or
greedy connections cut off; every case against a real `renderfarm api` process on a real Redis
(and S3 endpoint and worker where they matter), with real sockets. The parsing of ``size`` and
``seconds`` is also fuzzed directly (hypothesis).

One gateway (and, for the last test, one worker) serves the whole module; the Redis stall has its
own Redis and gateway, so pausing it touches nothing else.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from renderfarm.api.videos import BadParameter, parse_seconds, parse_size, render_kwargs
from tasks.keys import request_problems
from tasks.schemas import Limits, RenderRequest
from tests.gateway import Gateway, bytes_waiting_in, read_to_close, start_gateway
from tests.support import RedisServer, S3Server, TestWorker, wait_for, worker_environment

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")  # the SDK's own

MIB = 1024 * 1024
# The module's gateway: deadlines short enough for a test to wait them out, a small connection cap.
LIMITS = {"API_HEADER_TIMEOUT_S": "3", "API_BODY_TIMEOUT_S": "6", "API_MAX_CONNECTIONS": "16"}


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, s3_server: S3Server, model_cache: Path, tmp_path_factory: Any) -> dict[str, str]:
    """What conftest's ``worker_env`` gives one test, for the whole module (its own bucket, an empty Redis)."""
    redis_server.client.flushall()
    folder = tmp_path_factory.mktemp("hostile")
    return worker_environment(
        redis_server.url, s3_server.endpoint, f"test-{uuid.uuid4().hex[:12]}", model_cache, folder,
        MINIO_PUBLIC_ENDPOINT=f"http://localhost:{s3_server.port}", TEST_FOLDER=str(folder),
    )  # fmt: skip


@pytest.fixture(scope="module")
def starting_worker(env: dict[str, str]) -> Iterator[TestWorker]:
    """A tiny-wan worker, started with the module (it loads while the other tests run; none feeds it)."""
    started = TestWorker("hostile", {**env, "DEFAULT_MODEL": "tiny-wan"}, Path(env["TEST_FOLDER"]) / "worker.log",
                         ("--without-mingle", "--without-gossip"))  # fmt: skip
    yield started
    started.stop()


@pytest.fixture(scope="module")
def gateway(env: dict[str, str], starting_worker: TestWorker) -> Iterator[Gateway]:
    server = start_gateway(env, Path(env["TEST_FOLDER"]) / "gateway", API_MODELS="tiny-wan,tiny-wan-ti2v", **LIMITS)
    yield server
    server.stop()


@pytest.fixture
def worker(starting_worker: TestWorker) -> TestWorker:
    starting_worker.wait_ready()
    return starting_worker


def logged(gateway: Gateway, rid: str, line: str) -> bool:
    return f"{rid} {line}" in gateway.log_text()


# Inputs that crashed a request (500, no request id) before issue 26, and JSON values of the wrong type.
CRASHERS = [
    ({"prompt": "x", "size": "²x64"}, "size", "size: invalid size '²x64': expected WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "9" * 5000 + "x64"}, "size", "size: invalid size '9999999999"),
    ({"prompt": "x", "size": "64x٦٤"}, "size", "size: invalid size '64x٦٤': expected"),  # Arabic-Indic digits
    ({"prompt": "x", "seconds": "1e308"}, "seconds", "seconds: invalid seconds '1e308': a positive number"),
    ({"prompt": "x", "seconds": 1e308}, "seconds", "seconds: expected a string, got a number"),
    ({"prompt": "x", "seconds": "1_0"}, "seconds", "seconds: invalid seconds '1_0'"),
    ({"prompt": "x", "seconds": "١"}, "seconds", "seconds: invalid seconds '١'"),
    ({"prompt": "x", "seconds": "inf"}, "seconds", "seconds: invalid seconds 'inf'"),
    ({"prompt": "x", "seconds": "9" * 5000}, "seconds", "seconds: invalid seconds '9999999999"),
    ({"prompt": 5}, "prompt", "prompt: expected a string, got a number"),
    ({"prompt": "x", "model": ["tiny-wan"]}, "model", "model: expected a string, got an array"),
    ({"prompt": "x", "size": 64}, "size", "size: expected a string, got a number"),
    ({"prompt": "x", "seconds": True}, "seconds", "seconds: expected a string, got a boolean"),
]  # fmt: skip


def test_input_that_crashed_a_request_is_a_400_naming_the_parameter(gateway: Gateway):
    start = len(gateway.log_text())
    for body, param, message in CRASHERS:
        status, headers, error = gateway.create(body)
        assert status == 400 and error["error"]["param"] == param, (body, error)
        assert error["error"]["message"].startswith(message), (body, error)
        wait_for(lambda h=headers: logged(gateway, h["x-request-id"], "POST /v1/videos 400"), 10, "its log line")
    for raw in (b"[" * 100_000, b'{"prompt": ' * 50_000, b"\xff\xfe"):  # nested past Python's recursion limit
        status, headers, error = gateway.raw("POST", "/videos", raw)
        assert (status, error["error"]["code"]) == (400, "invalid_json") and headers["x-request-id"], error
    assert "Traceback" not in gateway.log_text()[start:]


def test_several_wrong_parameters_are_reported_together(gateway: Gateway):
    """Issue 25.3 through the gateway: every parameter's problem in one 400, the first as ``param``."""
    status, _, error = gateway.create({"model": "nope/none", "prompt": "x" * 5000, "size": "100x64", "seconds": "0"})
    assert status == 400, error
    expected = [
        ("prompt", "prompt: 5000 characters; at most 2000 are allowed"),
        ("model", "model: invalid model 'nope/none'; available: tiny-wan, tiny-wan-ti2v"),
        ("size", "size: width: Input should be a multiple of 16"),
        ("seconds", 'seconds: invalid seconds \'0\': a positive number in ASCII digits, e.g. "4" or "2.5"'),
    ]
    assert [(e["param"], e["message"]) for e in error["error"]["errors"]] == expected
    assert error["error"]["param"] == "prompt" and error["error"]["message"] == "; ".join(m for _, m in expected)
    # The model's own rules once the model is known: tiny-wan-ti2v's sides are multiples of 32, and the
    # seconds give frames over the worker's bounds.
    status, _, error = gateway.create({"prompt": "x", "model": "tiny-wan-ti2v", "size": "48x64", "seconds": "40"})
    assert [e["param"] for e in error["error"]["errors"]] == ["size", "seconds"], error
    assert "size: width: 48 is not a multiple of 32, which tiny-wan-ti2v needs" in error["error"]["message"]
    assert "(the seconds give 321 frames at 8 fps)" in error["error"]["message"]


def test_size_and_seconds_are_echoed_normalised(gateway: Gateway):
    # tiny-wan-ti2v: no worker of this module serves it, so the video stays queued and renders nothing.
    status, _, video = gateway.create({"prompt": "x", "model": "tiny-wan-ti2v", "size": "0064x064", "seconds": "01.50"})
    assert status == 200, video
    assert (video["size"], video["seconds"]) == ("64x64", "1.5")
    assert gateway.raw("GET", f"/videos/{video['id']}")[2]["seconds"] == "1.5"


def test_an_unexpected_error_is_a_500_with_the_request_id_logged_once(gateway: Gateway, redis_server: RedisServer):
    status, _, video = gateway.create({"prompt": "x", "model": "tiny-wan-ti2v"})
    assert status == 200
    start = len(gateway.log_text())
    redis_server.client.set(f"renderfarm:api:video:{video['id']}", b"{not json", keepttl=True)  # a damaged record
    status, headers, error = gateway.raw("GET", f"/videos/{video['id']}", headers={"x-request-id": "mine-500"})
    assert status == 500 and headers["x-request-id"] == "mine-500", error
    assert (error["error"]["type"], error["error"]["code"]) == ("server_error", "internal_error")
    assert "request id mine-500" in error["error"]["message"]
    wait_for(lambda: logged(gateway, "mine-500", f"GET /v1/videos/{video['id']} 500"), 10, "the request's line")
    log = gateway.log_text()[start:]
    assert log.count(f"mine-500 GET /v1/videos/{video['id']} failed") == 1 and log.count("Traceback") == 1
    assert "Exception in ASGI application" not in log  # not logged a second time by uvicorn
    redis_server.client.delete(f"renderfarm:api:video:{video['id']}")


def test_request_ids_are_echoed_and_logged_only_when_safe(gateway: Gateway):
    status, headers, _ = gateway.raw("GET", "/videos", headers={"x-request-id": "client-1.2:3/x+y=z"})
    assert status == 200 and headers["x-request-id"] == "client-1.2:3/x+y=z"
    wait_for(lambda: logged(gateway, "client-1.2:3/x+y=z", "GET /v1/videos 200"), 10, "its log line")
    hostile = [b"\x1b[2J\x1b[31mforged", b"line\xc2\x85forged", b"line\x85forged", b"a" * 129, b"b" * 60_000]
    for value in hostile:  # terminal escapes, U+0085 (NEL) in UTF-8 and latin-1, too long: replaced
        sock = gateway.socket()
        sock.sendall(b"GET /v1/videos/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nx-request-id: " + value + b"\r\n"
                     b"Authorization: Bearer " + gateway.keys["alice"].encode() + b"\r\n\r\n")  # fmt: skip
        head = read_to_close(sock).split(b"\r\n\r\n")[0].decode("latin-1")
        sock.close()
        assert head.startswith("HTTP/1.1 404"), head
        rid = next(line.split(": ")[1] for line in head.split("\r\n") if line.lower().startswith("x-request-id"))
        assert rid.startswith("req_") and len(rid) == 36, rid
        wait_for(lambda r=rid: logged(gateway, r, "replaced the client's x-request-id"), 10, "the replacement's line")
    log = gateway.log_text()
    assert "forged" not in log and "\x1b" not in log and "\x85" not in log and "a" * 129 not in log
    assert "b" * 129 not in log


def test_no_redirect_is_built_from_the_host_header(gateway: Gateway):
    for path in ("/videos/x/", "/videos/"):
        status, headers, error = gateway.raw("GET", path, headers={"Host": "evil.example"})
        assert status == 404 and "location" not in headers, (path, headers)
        assert error["error"]["message"] == "Not Found" and headers["x-request-id"].startswith("req_")


def test_a_url_as_input_reference_names_what_the_gateway_takes(gateway: Gateway):
    for url, start in [("https://example.invalid/cat.png", "input_reference: https:// URLs are not fetched; "),
                       ("s3://renders/inputs/cat.png", "input_reference: s3:// URLs are not read here; ")]:  # fmt: skip
        status, _, error = gateway.create({"prompt": "x", "model": "tiny-wan-ti2v", "input_reference": url})
        assert status == 400 and error["error"]["param"] == "input_reference", error
        assert error["error"]["message"] == start + (
            "send the image itself: a multipart file, or in JSON a data:image/png|jpeg|webp;base64,... URL"
        )


def test_slow_and_greedy_connections_are_cut_off(gateway: Gateway):
    """Half a request's headers, or none: 408 and closed (API_HEADER_TIMEOUT_S). Eight creates that
    each send 16 MiB minus one byte and stall: 408 each, closed, and the memory they took given back
    (API_BODY_TIMEOUT_S). A client gone mid-body: logged, no traceback. Over API_MAX_CONNECTIONS open
    connections: 503 with Retry-After."""
    start = len(gateway.log_text())
    halves = [gateway.socket() for _ in range(2)]  # both deadlines run while the bodies below are sent
    halves[0].sendall(b"GET /v1/videos HTTP/1.1\r\nHost: t\r\nAuthorization: Bea")

    process = psutil.Process(gateway.proc.pid)
    before = process.memory_info().rss
    head = (f"POST /v1/videos HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {gateway.keys['alice']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {16 * MIB}\r\n\r\n").encode()  # fmt: skip
    socks = [gateway.socket() for _ in range(8)]

    def send(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # cut off by the gateway: what this test is about
            sock.sendall(head + b" " * (16 * MIB - 1))

    senders = [threading.Thread(target=send, args=(s,)) for s in socks]
    for sender in senders:
        sender.start()
    for sock in halves:
        answer = read_to_close(sock)  # the server closes it
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    wait_for(lambda: process.memory_info().rss - before > 64 * MIB, 60, "the gateway to hold the bodies")
    answers = [read_to_close(s) for s in socks]  # each closed by the server after its answer
    for sender, sock in zip(senders, socks, strict=True):
        sender.join(30)
        sock.close()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert b"connection: close" in answer.lower()
    wait_for(lambda: process.memory_info().rss - before < 32 * MIB, 30, "the bodies' memory to be given back")

    gone = gateway.socket()  # half a body, then the client goes away: no answer to give, no error of the gateway's
    gone.sendall(head.replace(str(16 * MIB).encode(), b"1000") + b'{"prompt": ')
    gone.close()
    wait_for(lambda: "the client closed the connection before its request was read" in gateway.log_text()[start:], 10,
             "the gateway to note the client went away")  # fmt: skip

    idle = [gateway.socket() for _ in range(16)]  # the cap, held open by connections that send nothing
    port = gateway.port

    def held() -> int:
        return sum(1 for c in process.net_connections("tcp") if c.laddr.port == port and c.status == "ESTABLISHED")

    wait_for(lambda: held() >= 16, 10, "the gateway to accept the idle connections")
    status, headers, error = gateway.raw("GET", "/videos")
    assert status == 503 and error["error"]["code"] == "server_busy", error
    assert headers["retry-after"] == "1" and headers["connection"] == "close" and headers["x-request-id"]
    for sock in idle:
        sock.close()
    wait_for(lambda: gateway.raw("GET", "/videos")[0] == 200, 30, "a place once they are gone")
    assert "Traceback" not in gateway.log_text()[start:]


def test_a_stalled_redis_gets_503s_and_never_freezes_the_gateway(env: dict[str, str], tmp_path: Path):
    """Redis paused (SIGSTOP) while a create waits on it: requests that need no Redis are answered
    meanwhile, every endpoint that needs it answers 503 with Retry-After, and all is well once it is back."""
    redis = RedisServer(tmp_path)
    gateway = start_gateway({**env, "REDIS_URL": redis.url}, tmp_path / "gateway", API_REDIS_TIMEOUT_S="2")
    try:
        status, _, video = gateway.create({"prompt": "before the stall"})
        assert status == 200
        answers: dict[str, tuple[int, dict[str, str], Any]] = {}

        def call(name: str, method: str, path: str, body: bytes | None = None) -> threading.Thread:
            thread = threading.Thread(target=lambda: answers.__setitem__(name, gateway.raw(method, path, body)))
            thread.start()
            return thread

        with redis.paused():
            create = call("create", "POST", "/videos", json.dumps({"prompt": "during the stall"}).encode())
            wait_for(lambda: bytes_waiting_in(redis.port) > 0, 10, "the create's command to wait in Redis")
            assert gateway.raw("GET", "/openapi.json", owner=None, root="")[0] == 200  # no Redis needed: served now
            assert gateway.raw("GET", "/videos", owner=None)[0] == 401
            assert gateway.create({"prompt": "x", "size": "big"})[0] == 400
            assert create.is_alive()  # all three answered while the create still waited on Redis
            others = [call("retrieve", "GET", f"/videos/{video['id']}"), call("list", "GET", "/videos"),
                      call("content", "GET", f"/videos/{video['id']}/content"),
                      call("delete", "DELETE", f"/videos/{video['id']}")]  # fmt: skip
            for thread in [create, *others]:
                thread.join(60)
        for name, (status, headers, error) in answers.items():
            assert status == 503 and error["error"]["code"] == "queue_unavailable", (name, error)
            assert headers["retry-after"] == "5" and headers["x-request-id"], (name, headers)
        assert gateway.raw("GET", f"/videos/{video['id']}")[2]["status"] == "queued"  # the failed delete did nothing
        assert gateway.create({"prompt": "after the stall"})[0] == 200
        assert "Traceback" not in gateway.log_text()
    finally:
        gateway.stop()
        redis.stop()


def test_a_valid_create_renders_after_all_of_it(gateway: Gateway, worker: TestWorker):
    """The module's worker renders what the gateway accepts, and received nothing the gateway refused."""
    done = gateway.client().videos.create_and_poll(prompt="still serving", model="tiny-wan", size="64x64",
                                                   seconds="0.5", poll_interval_ms=200)  # fmt: skip
    assert (done.status, done.size, done.seconds) == ("completed", "64x64", "0.5"), done
    assert worker.log.count("render tiny-wan:") == 1  # of every request this module sent, only this one rendered


# --- The parsing of size and seconds, fuzzed (no server) ------------------------------------------------

GATEWAY_LIMITS = Limits(max_prompt_chars=2000, max_pixel_frames=1280 * 720 * 129, models=("tiny-wan", "tiny-wan-ti2v"))
DIGITS = st.characters(categories=["Nd", "No"])  # every kind of digit: ASCII, Arabic-Indic, superscripts, ...
SIZES = st.one_of(
    st.text(max_size=30),
    st.builds(lambda w, h: f"{w}x{h}", st.integers(0, 10**7), st.integers(0, 10**7)),
    st.builds(lambda w, h: f"{w}x{h}", st.text(DIGITS, min_size=1, max_size=6), st.text(DIGITS, max_size=6)),
    st.just("9" * 5000 + "x64"),
)
SECONDS = st.one_of(
    st.text(max_size=30),
    st.text(DIGITS, min_size=1, max_size=8),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.decimals(allow_nan=False, allow_infinity=False, places=6).map(str),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["1e308", "1_0", "0x10", " 4", "4 ", "+4", "-0", "0.0000001", "9" * 5000]),
)
SCALARS = st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner))


@settings(max_examples=300, deadline=None)
@given(SIZES)
def test_a_size_is_two_runs_of_ascii_digits_or_a_bad_parameter(text: str):
    try:
        width, height = parse_size(text)
    except BadParameter as exc:
        assert exc.param == "size" and str(exc).startswith("size: ")
        return
    assert text.isascii() and f"{int(text.split('x')[0])}x{int(text.split('x')[1])}" == f"{width}x{height}"


@settings(max_examples=300, deadline=None)
@given(SECONDS)
def test_seconds_are_a_positive_ascii_decimal_or_a_bad_parameter(text: str):
    try:
        seconds = parse_seconds(text)
    except BadParameter as exc:
        assert exc.param == "seconds" and str(exc).startswith("seconds: ")
        return
    assert text.isascii() and seconds.is_finite() and seconds > 0 and seconds == Decimal(text)
    assert parse_seconds(format(seconds.normalize(), "f")) == seconds  # what is echoed reads back the same


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "prompt": st.text(max_size=50) | JSON_VALUES, "model": st.sampled_from(["tiny-wan", "tiny-wan-ti2v", "sora-2"]) |
    JSON_VALUES, "size": SIZES | JSON_VALUES, "seconds": SECONDS | JSON_VALUES, "extra": JSON_VALUES}))  # fmt: skip
def test_the_gateway_queues_only_what_a_worker_accepts(params: dict[str, Any]):
    """Any JSON for the four parameters: a list of problems each naming a parameter, never an exception;
    and when there is none, a render request that the worker's own checks accept."""
    kwargs, problems = render_kwargs(params, GATEWAY_LIMITS)
    for param, message in problems:
        assert message.startswith(f"{param}: ") and (param in params or param == "prompt"), (param, message)
    if not problems:
        request = RenderRequest.model_validate(kwargs)
        assert request_problems(request.model_dump(exclude_none=True), kwargs["model"], GATEWAY_LIMITS) == []
