"""The self-check and the fallback chain, with /dev/shm broken in a private mount namespace.

Each worker runs under ``unshare -m`` with a fresh tmpfs on /dev/shm (read-only, or 1 MiB): the
host's /dev/shm is untouched. ``ENGINE=fastvideo`` asks for FastVideo's mp executor, which cannot
run there; the self-check must say why and what to set, then fall back in ``ENGINE_FALLBACKS``
order or exit non-zero. These tests need root (for the mount). All but one end before FastVideo
would be imported, so they run in the main .venv too (where ray is not installed, and the chain
says it skipped it); the fallback to FastVideo's Ray executor runs where fastvideo and ray are
installed (.venv-fastvideo).
"""

from __future__ import annotations

import importlib.util

import pytest
from celery import Celery

from tests.fastvideo_support import ShmWorker, can_unshare
from tests.support import download_verified

pytestmark = pytest.mark.skipif(not can_unshare(), reason="needs root and `unshare -m` (a private mount namespace)")

READ_ONLY = "ro,size=64m"
TINY = "size=1m"


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def fastvideo_installed() -> bool:
    return importlib.util.find_spec("fastvideo") is not None


@pytest.fixture
def shm_worker(worker_env, tmp_path):
    started: list[ShmWorker] = []

    def start(mount_options: str, wait: bool = True, **overrides: str) -> ShmWorker:
        worker = ShmWorker(
            f"shm{len(started)}", {**worker_env, **overrides}, tmp_path / f"shm{len(started)}.log", mount_options
        )
        started.append(worker)
        return worker.wait_ready() if wait else worker

    yield start
    for worker in started:
        worker.stop()


def test_read_only_shm_stops_the_worker_before_its_pool_starts_with_the_fix(shm_worker, producer: Celery):
    # Celery's prefork pool needs multiprocessing locks itself: no engine fallback can help here.
    queued = producer.send_task("tasks.render", kwargs={"prompt": "waiting"}, queue="render")
    worker = shm_worker(READ_ONLY, wait=False, ENGINE="fastvideo")
    assert worker.proc.wait(120) == 1
    log = worker.log
    assert "FATAL: cannot create a multiprocessing lock in /dev/shm (Read-only file system)" in log
    assert "--ipc=host" in log and "--shm-size=8g" in log and "ipc_mode" in log and "shm_size" in log
    assert "engine loaded" not in log
    assert queued.state == "PENDING"


def test_tiny_shm_is_diagnosed_and_the_worker_falls_back_to_diffusers(shm_worker, producer: Celery):
    # Where ray is installed, "ray,diffusers" stops at ray (next test): the order given is honoured both ways.
    fallbacks = "diffusers,ray" if ray_installed() else "ray,diffusers"
    worker = shm_worker(TINY, ENGINE="fastvideo", ENGINE_FALLBACKS=fallbacks, MIN_SHM_MB="512")
    log = worker.log
    assert "Multiprocessing OK: [2, 4, 6]" in log  # the spawn pool inside the pool child: small locks fit
    assert "/dev/shm: FAILED: 1 MiB free, below MIN_SHM_MB=512" in log  # FastVideo's tensors would not
    assert "fallback to the diffusers engine" in log and "--shm-size=8g" in log
    if not ray_installed():
        assert "(skipped: ray (the ray package is not installed))" in log
    assert "engine loaded: engine=diffusers" in log
    result = producer.send_task("tasks.render", kwargs={"prompt": "still works"}, queue="render").get(timeout=120)
    assert result["engine"] == "diffusers"


@pytest.mark.skipif(not (ray_installed() and fastvideo_installed()), reason="needs fastvideo and ray installed")
@pytest.mark.timeout(600)
def test_tiny_shm_falls_back_to_fastvideos_ray_executor_and_renders(shm_worker, producer: Celery, tmp_path):
    worker = shm_worker(TINY, ENGINE="fastvideo", ENGINE_FALLBACKS="ray,diffusers", MIN_SHM_MB="512")
    log = worker.log
    assert "/dev/shm: FAILED: 1 MiB free, below MIN_SHM_MB=512" in log
    assert "FastVideo's mp executor cannot run here; fallback to the Ray executor" in log and "--shm-size=8g" in log
    assert "skipped" not in log
    assert "Ray started in pid" in log and "engine loaded: engine=fastvideo" in log
    assert "The object store is using /tmp/ray instead of /dev/shm" in log  # Ray's own fallback: slower, works
    kwargs = {"prompt": "ray on a tiny /dev/shm", "height": 48, "width": 80, "num_frames": 13, "fps": 12}
    result = producer.send_task("tasks.render", kwargs=kwargs, queue="render").get(timeout=180)
    assert result["engine"] == "fastvideo"
    stream = download_verified(result, tmp_path / "ray.mp4")
    assert (stream["codec_name"], stream["width"], stream["height"], int(stream["nb_read_frames"])) == (
        "h264", 80, 48, 13,
    )  # fmt: skip


def test_tiny_shm_without_fallbacks_exits_non_zero_with_the_fix(shm_worker, producer: Celery):
    queued = producer.send_task("tasks.render", kwargs={"prompt": "waiting"}, queue="render")
    worker = shm_worker(TINY, wait=False, ENGINE="fastvideo", ENGINE_FALLBACKS="none", MIN_SHM_MB="512")
    assert worker.proc.wait(120) != 0
    log = worker.log
    assert "Multiprocessing OK: [2, 4, 6]" in log  # small locks fit; the tensors would not
    assert "below MIN_SHM_MB=512" in log
    assert "FastVideo's mp executor cannot run in this container" in log and "--shm-size=8g" in log
    assert "ENGINE_FALLBACKS=none" in log
    assert "engine loaded" not in log
    assert "render tiny-wan:" not in log  # the task never started (the main process may have prefetched it)
    assert queued.state == "PENDING"  # it never took the task


@pytest.mark.skipif(ray_installed(), reason="checks the chain past a missing ray package")
def test_fallback_order_is_honoured(shm_worker):
    worker = shm_worker(TINY, wait=False, ENGINE="fastvideo", ENGINE_FALLBACKS="ray", MIN_SHM_MB="512")
    assert worker.proc.wait(120) != 0
    assert "fallbacks skipped: ray (the ray package is not installed)" in worker.log


def test_a_healthy_shm_keeps_the_configured_engine(shm_worker):
    worker = shm_worker("size=2g", ENGINE="diffusers")
    assert "Multiprocessing OK: [2, 4, 6]" in worker.log
    assert "/dev/shm: 2.0 GiB, 2.0 GiB free, writable" in worker.log
    assert "fallback" not in worker.log
