"""The OpenAI-compatible videos API (issue 18, first part): the official `openai` SDK renders,
follows progress, lists, downloads and cancels through `renderfarm api`, against a real Redis, S3
endpoint and worker; raw HTTP for the errors (OpenAI's error objects, the parameter named).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway import Gateway
from tests.gateway import start_gateway as launch
from tests.support import PACED, ROOT, ffprobe, wait_for

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")  # the SDK's own


@pytest.fixture
def start_gateway(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """``start_gateway(**env)``: `renderfarm api` with two keys (alice, bob) and these settings."""
    servers: list[Gateway] = []

    def start(**overrides: str) -> Gateway:
        servers.append(launch(worker_env, tmp_path, **overrides))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway()


def test_the_openai_sdk_renders_follows_downloads_lists_and_cancels(gateway: Gateway, start_worker, producer,
                                                                    tmp_path: Path):  # fmt: skip
    from openai import NotFoundError

    start_worker(DEFAULT_MODEL="tiny-wan", **{**PACED, "PACE_STEP_S": "0.6"})
    client = gateway.client()

    done = client.videos.create_and_poll(prompt="a fox in the snow", model="tiny-wan", size="64x48", seconds="1",
                                         poll_interval_ms=200)  # fmt: skip
    assert (done.status, done.progress, done.error) == ("completed", 100, None), done
    assert (done.model, done.size, done.seconds, done.prompt) == ("tiny-wan", "64x48", "1", "a fox in the snow")
    assert done.completed_at and done.created_at <= done.completed_at <= done.expires_at
    assert client.videos.retrieve(done.id).completed_at == done.completed_at  # recorded once

    video = tmp_path / "fox.mp4"
    client.videos.download_content(done.id).write_to_file(video)
    stream = ffprobe(video)
    assert (stream["width"], stream["height"], int(stream["nb_read_frames"])) == (64, 48, 9)  # 1 s at 8 fps: 9 = 4k+1
    assert client.videos.download_content(done.id, variant="thumbnail").read()[:3] == b"\xff\xd8\xff"  # a JPEG
    from PIL import Image

    sheet = Image.open(client.videos.download_content(done.id, variant="spritesheet"))
    assert (sheet.format, sheet.size) == ("JPEG", (192, 144))  # 9 frames of 64x48, 3 by 3

    # Progress while it renders, then a cancel through DELETE (4 steps of 0.6 s or more).
    running = client.videos.create(prompt="to be cancelled", model="tiny-wan", size="64x64")
    seen = []
    wait_for(lambda: seen.append(client.videos.retrieve(running.id)) or seen[-1].status == "in_progress", 60,
             "the render to start")  # fmt: skip
    wait_for(lambda: client.videos.retrieve(running.id).progress > 0, 30, "progress from the denoising steps")
    deleted = client.videos.delete(running.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (running.id, True, "video.deleted")
    # DELETE waited for the cancel and says where the render stopped (tasks.cancel.Cancellation).
    cancellation = (deleted.model_extra or {})["cancellation"]
    assert cancellation["outcome"] == "stopped", cancellation
    assert cancellation["stage"] in ("denoising", "decoding", "encoding", "uploading"), cancellation
    assert cancellation["message"].startswith(f"render {running.id} stopped "), cancellation
    with pytest.raises(NotFoundError):
        client.videos.retrieve(running.id)
    assert producer.AsyncResult(running.id).state == "REVOKED"  # it had stopped when DELETE answered

    # Listing pages as the SDK pages (cursor `after`), newest first; another key sees none of it.
    queued = [client.videos.create(prompt=f"queued {i}", model="tiny-wan").id for i in range(3)]
    listed = [v.id for v in client.videos.list(limit=2)]
    assert listed == [*reversed(queued), done.id]
    first = client.videos.list(limit=2)
    assert first.has_more and [v.id for v in first.data] == list(reversed(queued))[:2]
    assert [v.id for v in gateway.client("bob").videos.list()] == []
    with pytest.raises(NotFoundError):
        gateway.client("bob").videos.retrieve(done.id)
    assert gateway.keys["alice"] not in gateway.log.read_text()  # keys are never logged


BAD_REQUESTS = [
    ({"prompt": "x", "size": "65x64"}, "size", "size: width: Input should be a multiple of 16"),
    ({"prompt": "x", "size": "big"}, "size", "expected WIDTHxHEIGHT"),
    ({"prompt": "x", "model": "sora-2"}, "model", "available: tiny-wan"),
    ({"prompt": "x", "seconds": "abc"}, "seconds", "a positive number"),
    ({"prompt": "x", "seconds": "300"}, "seconds", "frames at 8 fps"),
    ({"prompt": ""}, "prompt", "prompt:"),
    ({"prompt": "x", "style": "noir"}, "style", "allowed: prompt, model, seconds, size"),
    ({"prompt": "x", "input_reference": "data:image/png;base64,AAAA"}, "input_reference",
     "input_reference: tiny-wan is a text-to-video model and takes no image; models that do: tiny-wan-ti2v"),
]  # fmt: skip


def test_bad_requests_get_openai_errors_naming_the_parameter(gateway: Gateway):
    for body, param, message in BAD_REQUESTS:
        status, headers, error = gateway.raw("POST", "/videos", json.dumps(body).encode())
        assert status == 400, (body, error)
        assert error["error"]["param"] == param and message in error["error"]["message"], (body, error)
        assert error["error"]["type"] == "invalid_request_error" and headers["x-request-id"].startswith("req_")


def test_keys_missing_videos_and_oversized_bodies(gateway: Gateway):
    for headers, owner in (({}, None), ({"Authorization": "Bearer rf-not-a-key"}, None)):
        status, _, error = gateway.raw("GET", "/videos", headers=headers, owner=owner)
        assert status == 401 and error["error"]["code"] == "invalid_api_key"
    status, headers, error = gateway.raw("GET", "/videos/video_0000", headers={"x-request-id": "mine-1"})
    assert status == 404 and error["error"]["param"] == "video_id" and headers["x-request-id"] == "mine-1"
    wait_for(lambda: "mine-1 GET /v1/videos/video_0000 404" in gateway.log.read_text(), 10, "the request's log line")

    # 100 MB declared: refused from the header, before any of it is read (nothing is sent here).
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    connection.putrequest("POST", "/v1/videos")
    for name, value in (("Authorization", f"Bearer {gateway.keys['alice']}"), ("Content-Type", "application/json"),
                        ("Content-Length", str(100 * 1024 * 1024))):  # fmt: skip
        connection.putheader(name, value)
    connection.endheaders()
    started = time.monotonic()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 10
    connection.close()


def test_each_key_has_a_rate_and_a_concurrency_quota(start_gateway: Callable[..., Gateway]):
    """Only creations that are made use up the rate: those refused for the concurrency quota give
    their count back (issue 26: 2 made, 4 refused, both deleted, and the next create got 429)."""
    gateway = start_gateway(API_RATE_LIMIT_PER_MIN="4", API_MAX_ACTIVE="2")  # no worker: videos stay queued
    if time.time() % 60 > 45:  # the creates below fall in one rate window
        time.sleep(61 - time.time() % 60)

    def create(owner: str = "alice") -> tuple[int, dict[str, str], Any]:
        return gateway.create({"prompt": "queued"}, owner=owner)

    made = [create(), create()]
    assert [status for status, _, _ in made] == [200, 200]
    for _ in range(4):  # over the concurrency quota: refused, and not counted against the rate
        status, headers, error = create()
        assert status == 429 and error["error"]["code"] == "concurrency_limit" and int(headers["retry-after"]) > 0
    assert create("bob")[0] == 200  # another key has its own quotas
    for video in made:  # deleted videos free their places
        assert gateway.raw("DELETE", f"/videos/{video[2]['id']}")[0] == 200
    third, fourth = create(), create()  # the third and fourth creations made this minute
    assert third[0] == fourth[0] == 200, (third, fourth)
    assert gateway.raw("DELETE", f"/videos/{third[2]['id']}")[0] == 200
    status, headers, error = create()  # a place is free, but the minute's four are used
    assert status == 429 and error["error"]["code"] == "rate_limit_exceeded", error
    assert error["error"]["type"] == "rate_limit_error" and 0 < int(headers["retry-after"]) <= 60


def test_schemathesis_finds_no_server_error_in_the_served_schema(start_gateway: Callable[..., Gateway],
                                                                 tmp_path: Path):  # fmt: skip
    """Property tests against the served OpenAPI schema: random and boundary values for every
    parameter and body field of every endpoint, with a valid key, and creates with every kind of
    digit and huge numbers in ``size`` and ``seconds`` (tests/schemathesis_hooks.py); no answer may be a 5xx."""
    gateway = start_gateway(API_RATE_LIMIT_PER_MIN="0", API_MAX_ACTIVE="0")
    hooks = {"SCHEMATHESIS_HOOKS": str(ROOT / "tests" / "schemathesis_hooks.py"), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"http://127.0.0.1:{gateway.port}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "40", "--generation-deterministic",
         "--header", f"Authorization: Bearer {gateway.keys['alice']}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,  # its cache stays out of the checkout
        env={**os.environ, **hooks},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    counted = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert counted and counted[1] == counted[2] and int(counted[1]) >= 100, run.stdout[-2000:]  # it ran for real


def test_curl_creates_a_video_with_a_multipart_form_and_reads_it_back(gateway: Gateway):
    """The raw HTTP a non-Python producer sends: curl, a multipart form (what OpenAI's docs show), a bearer key."""
    auth = f"Authorization: Bearer {gateway.keys['alice']}"
    created = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{gateway.base}/videos", "-H", auth, "-F", "prompt=from curl", "-F",
         "model=tiny-wan", "-F", "size=64x64", "-F", "seconds=1"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    video = json.loads(created)
    assert (video["object"], video["status"], video["size"], video["seconds"]) == ("video", "queued", "64x64", "1")
    read = subprocess.run(["curl", "-sS", "-i", f"{gateway.base}/videos/{video['id']}", "-H", auth],
                          capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    head, _, body = read.partition("\n\n")  # text mode: curl's CRLFs read as newlines
    assert head.startswith("HTTP/1.1 200") and "x-request-id: req_" in head.lower()
    assert json.loads(body)["id"] == video["id"]
    refused = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"{gateway.base}/videos"],
                             capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    assert refused == "401"


def test_the_sdk_renders_from_an_input_reference_on_a_model_that_takes_images(
    start_gateway: Callable[..., Gateway], start_worker, producer, tmp_path: Path
):
    """``input_reference`` as the SDK sends it (a multipart file), and as a data URL in JSON (curl): the
    worker renders from that image (its hash in the result); bad images and text-only models get 400s."""
    import hashlib

    from tasks.images import data_url
    from tests.test_image_renders import picture

    gateway = start_gateway(API_MODELS="tiny-wan-ti2v,tiny-wan", PRESIGN_EXPIRES_S="600")
    start_worker(MODEL_ID="tiny-wan-ti2v")
    client = gateway.client()
    (tmp_path / "first.png").write_bytes(picture(1))
    with open(tmp_path / "first.png", "rb") as image:
        done = client.videos.create_and_poll(prompt="from an image", model="tiny-wan-ti2v", size="96x64",
                                             seconds="1", input_reference=image, poll_interval_ms=200)  # fmt: skip
    assert (done.status, done.size) == ("completed", "96x64"), done
    result = producer.AsyncResult(done.id).result
    assert result["image_sha256"] == hashlib.sha256(picture(1)).hexdigest()
    client.videos.download_content(done.id).write_to_file(tmp_path / "first.mp4")
    assert (ffprobe(tmp_path / "first.mp4")["width"], ffprobe(tmp_path / "first.mp4")["height"]) == (96, 64)
    # With storage credentials the gateway signs the redirect itself, at request time (its own
    # PRESIGN_EXPIRES_S, 600 s, not the worker's 24 h): a video's content never expires before its record.
    status, headers, _ = gateway.raw("GET", f"/videos/{done.id}/content")
    assert status == 307 and "X-Amz-Expires=600" in headers["location"] and "X-Amz-Expires=86400" in result["url"]
    assert headers["location"].split("?")[0] == result["url"].split("?")[0]

    body = {"prompt": "from an image", "model": "tiny-wan-ti2v", "size": "96x64", "seconds": "1",
            "input_reference": data_url(picture(1))}  # fmt: skip
    created = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{gateway.base}/videos", "-H", f"Authorization: Bearer {gateway.keys['alice']}",
         "-H", "Content-Type: application/json", "--data-binary", "@-"],
        input=json.dumps(body), capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    again = producer.AsyncResult(json.loads(created)["id"]).get(timeout=120)
    # The same image by another route: the same stored input (each API video has its own seed, so its own video).
    assert (again["image_sha256"], again["image_key"]) == (result["image_sha256"], result["image_key"])

    gif = tmp_path / "anim.gif"
    from PIL import Image

    Image.new("P", (32, 32)).save(gif, "GIF")
    for params, upload, message in [
        ({"model": "tiny-wan"}, tmp_path / "first.png", "input_reference: tiny-wan is a text-to-video model"),
        ({"model": "tiny-wan-ti2v"}, gif, "input_reference: the bytes are not a PNG, JPEG or WebP image"),
    ]:
        status, _, error = gateway.raw("POST", "/videos", *multipart({"prompt": "x", **params}, upload.read_bytes()))
        assert status == 400 and error["error"]["param"] == "input_reference", error
        assert error["error"]["message"].startswith(message), error


def multipart(fields: dict[str, str], file: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body with ``fields`` and ``input_reference`` as a file part, and its header."""
    boundary = "renderfarm-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]  # fmt: skip
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="input_reference"; filename="x.png"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + file + b"\r\n")  # fmt: skip
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"
    }


def test_the_documented_key_command_makes_a_keys_file_the_gateway_reads(worker_env: dict[str, str], tmp_path: Path):
    """.env.example's `renderfarm api-key NAME >> ./api-keys`, run as written: the key goes to the
    terminal, its hash line to the file, and `renderfarm api` reads that file and takes the key.
    Without API_MODELS or DEFAULT_MODEL, `renderfarm api` refuses to start and names both."""
    env = {**worker_env, "PATH": f"{Path(sys.executable).parent}:{worker_env['PATH']}", "PYTHONPATH": str(ROOT)}
    documented = re.search(r"`(renderfarm api-key NAME >> [^`]+)`", (ROOT / ".env.example").read_text())
    assert documented, "the keys command is no longer in .env.example"
    commands = " && ".join(documented[1].replace("NAME", name) for name in ("carol", "dave"))
    made = subprocess.run(["bash", "-c", commands], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    keys = re.findall(r"\brf-[A-Za-z0-9_-]{40,}", made.stderr)
    assert len(keys) == 2 and made.stdout == "", made
    keys_file = tmp_path / documented[1].split(">> ")[1]
    assert [line.split(":")[0] for line in keys_file.read_text().splitlines()] == ["carol", "dave"]

    bare = {k: v for k, v in env.items() if k not in ("DEFAULT_MODEL", "API_MODELS")}
    refused = subprocess.run(["renderfarm", "api", "--port", "0"], env={**bare, "API_KEYS_FILE": str(keys_file)},
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2, refused
    assert "API_MODELS" in refused.stderr and "DEFAULT_MODEL" in refused.stderr and "Traceback" not in refused.stderr

    gateway = launch(env, tmp_path / "gateway", API_KEYS_FILE=str(keys_file))
    try:
        for key in keys:
            status, _, listed = gateway.raw("GET", "/videos", headers={"Authorization": f"Bearer {key}"}, owner=None)
            assert status == 200 and listed["data"] == [], listed
    finally:
        gateway.stop()
