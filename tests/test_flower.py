"""Flower for real (issue 15): `renderfarm flower` with the app loaded and basic auth, a real
worker, and Debian's headless chromium driving Flower's pages through chromedriver (Selenium).

What it proves: no credentials, no page and no API (``/healthcheck`` and ``/metrics`` stay open, a
documented decision); Flower sends a render (``async-apply``) and reads its result from the
result backend; its dashboard lists the worker; a finished render's page shows its result; a
cancelled render's page shows ``REVOKED`` (it stayed ``PROGRESS`` before).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tasks.cancel import cancel
from tests.support import PACED, ROOT, free_port, wait_for, wait_for_denoising

USER, PASSWORD = "operator", "flower-test-" + "9" * 12
SLOW = {"prompt": "to be cancelled", "height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 150}


class Flower:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def request(self, path: str, data: dict[str, Any] | None = None, auth: bool = True) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(self.base + path, data=body, method="POST" if body else "GET")
        if auth:
            request.add_header("Authorization", self.auth)
        if body:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=150) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, path: str, data: dict[str, Any] | None = None) -> Any:
        status, body = self.request(path, data)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)


@contextlib.contextmanager
def running_flower(env: dict[str, str], tmp_path: Path) -> Iterator[Flower]:
    """`renderfarm flower` with ``env`` (and the test's credentials), until the block ends."""
    port = free_port()
    env = {**env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
    log = open(tmp_path / "flower.log", "wb")  # closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "renderfarm.cli", "flower", "--port", str(port), "--db", str(tmp_path / "flower.db")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = Flower(port)
    try:
        wait_for(lambda: _answers(server), 60, "Flower to answer /healthcheck")
        yield server
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


@pytest.fixture
def flower(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Flower]:
    with running_flower(worker_env, tmp_path) as server:
        yield server


def _answers(server: Flower) -> bool:
    try:
        return server.request("/healthcheck", auth=False)[0] == 200
    except OSError:
        return False


@pytest.fixture
def browser(flower: Flower) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are missing: run `make install`"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_page_load_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()


def page(chrome: Any, url: str, text: str, timeout: float = 60) -> str:
    """Open ``url`` and wait until its rendered page shows ``text``; the page's text."""
    chrome.get(url)
    wait_for(lambda: text in chrome.find_element("tag name", "body").text, timeout, f"{text!r} on {url}")
    return str(chrome.find_element("tag name", "body").text)


def test_flower_sends_shows_and_cancels_renders_behind_basic_auth(
    flower: Flower, browser: Any, start_worker, producer: Celery
):
    worker = start_worker(**PACED)

    # No credentials: no page, no API. The probes' paths stay open (docs/monitoring.md says why).
    for path in ("/", "/workers", "/tasks", "/api/workers", "/api/task/result/x"):
        assert flower.request(path, auth=False)[0] == 401, path
    assert flower.request("/healthcheck", auth=False) == (200, b"OK")
    assert flower.request("/metrics", auth=False)[0] == 200
    browser.get(flower.base + "/workers")
    assert worker.hostname not in browser.page_source

    # Flower sends a render through the app it loaded, and reads its result from the result backend.
    sent = flower.json("/api/task/async-apply/tasks.render", {"kwargs": {"prompt": "sent by Flower", "seed": 4}})
    flower.json(f"/api/task/result/{sent['task-id']}?timeout=120")  # waits (its "state" is read before)
    done = flower.json(f"/api/task/result/{sent['task-id']}")
    assert done["state"] == "SUCCESS" and done["result"]["seed"] == 4 and done["result"]["key"].endswith(".mp4")

    # A render cancelled mid-way ends REVOKED in Flower, from the worker's events.
    running = producer.send_task("tasks.render", kwargs={**SLOW, "seed": 5}, queue="render")
    wait_for_denoising(running)
    cancel(running.id, app=producer)
    wait_for(lambda: flower.json(f"/api/task/info/{running.id}").get("state") == "REVOKED", 60, "REVOKED in Flower")
    assert producer.AsyncResult(running.id).state == "REVOKED"

    # The same, in a real browser with the credentials.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": flower.auth}})
    page(browser, flower.base + "/workers", worker.hostname)  # the dashboard lists the worker

    # Its page's Queues tab shows what it consumes (Celery's active_queues): renderfarm workers shows the same.
    # (Flower asks the worker when the page is opened, within its inspect timeout of 1 s: opened again until it has.)
    def queues_tab() -> list[str] | None:
        browser.get(f"{flower.base}/worker/{worker.hostname}")
        shown = re.search(r'<tbody id="worker-queues">(.*?)</tbody>', browser.page_source, re.S)
        rows = re.findall(r"<tr>\s*<td>([^<]*)</td>", shown[1]) if shown else []  # a row's first cell: the name
        return rows or None

    assert wait_for(queues_tab, 60, "the worker's page") == ["render", "render.tiny-wan"]
    finished = page(browser, f"{flower.base}/task/{sent['task-id']}", "SUCCESS")
    assert done["result"]["key"] in finished  # its page shows the result
    cancelled = page(browser, f"{flower.base}/task/{running.id}", "REVOKED")
    assert "PROGRESS" not in cancelled


def test_renderfarm_flower_refuses_to_run_without_a_password(worker_env):
    env = {k: v for k, v in worker_env.items() if k != "FLOWER_BASIC_AUTH"}
    result = subprocess.run(
        [sys.executable, "-m", "renderfarm.cli", "flower", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and "set FLOWER_BASIC_AUTH=user:password" in result.stderr
