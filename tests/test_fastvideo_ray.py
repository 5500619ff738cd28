"""FastVideo's Ray executor (``DISTRIBUTED_EXECUTOR_BACKEND=ray``) on CPU, on tiny-wan, in real prefork workers.

The pool child owns a private Ray instance (``tasks.engines.fastvideo_ray``): Ray's daemons are its
children, FastVideo's actor is the raylet's child. A Ray executor on a host without a default route
(a loopback-only namespace) renders in tests/test_fastvideo_gpu_smoke.py, whose smoke runs there.
Run in .venv-fastvideo (fastvideo and ray installed):

    make test-fastvideo      # .venv-fastvideo/bin/python -m pytest tests/test_fastvideo*.py
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import psutil
import pytest
from celery import Celery

from tests.fastvideo_support import command_line, ray_processes, session_processes, stop_leaves_nothing, wait_gone
from tests.support import download_verified, videos_in, wait_for, wait_for_denoising

pytest.importorskip("fastvideo", reason="fastvideo is not installed: run scripts/install-fastvideo.sh")
pytest.importorskip("ray", reason="ray is not installed: run scripts/install-fastvideo.sh")

pytestmark = pytest.mark.timeout(600)

RAY = {"ENGINE": "fastvideo", "DISTRIBUTED_EXECUTOR_BACKEND": "ray"}
SMALL = {"prompt": "a red fox running through snow", "height": 48, "width": 80, "num_frames": 13, "fps": 12, "seed": 3}
SLOW = {"prompt": "a slow render", "height": 128, "width": 128, "num_frames": 33, "num_inference_steps": 60, "seed": 11}


def actors(processes: list[psutil.Process]) -> list[psutil.Process]:
    """FastVideo's Ray actors (``ray::RayWorkerWrapper``) among ``processes``."""
    return [p for p in processes if command_line(p).startswith("ray::RayWorkerWrapper")]


def new_actor(child: psutil.Process, replacing: psutil.Process) -> psutil.Process:
    """The actor that replaced ``replacing`` in the child's Ray instance (once the old one is gone)."""

    def replaced() -> list[psutil.Process]:
        now = actors(ray_processes(child))
        return now if len(now) == 1 and now[0].pid != replacing.pid else []

    wait_for(replaced, 60, "a new actor in place of the dead one")
    return replaced()[0]


def test_render_through_the_queue_with_the_ray_executor_on_cpu(
    start_worker, worker_env, producer: Celery, s3, bucket, tmp_path
):
    worker = start_worker(**RAY)
    log = worker.log
    assert "CUDA available: False" in log and "FastVideo CPU-compatibility layer applied" in log
    assert "Ray started in pid" in log and "'GPU': 1.0" in log  # one logical GPU slot, declared on CPU
    assert "engine loaded: engine=fastvideo" in log
    [child] = worker.pool_children()
    [actor] = actors(ray_processes(child))  # FastVideo's worker: one Ray actor per (logical) GPU

    first = producer.send_task("tasks.render", kwargs=SMALL, queue="render").get(timeout=180)
    second = producer.send_task("tasks.render", kwargs={**SMALL, "seed": 4}, queue="render").get(timeout=180)

    assert first["engine"] == "fastvideo" and first["model"] == "tiny-wan" and first["cached"] is False
    stream = download_verified(first, tmp_path / "video.mp4")  # size and sha256 match the result
    assert stream["codec_name"] == "h264"
    assert (stream["width"], stream["height"], int(stream["nb_read_frames"])) == (80, 48, 13)
    assert stream["avg_frame_rate"] == "12/1"
    # Loaded once; both renders ran in the same Ray actor, which applied the CPU layer itself.
    assert first["worker_pid"] == second["worker_pid"] == child.pid and worker.log.count("engine loaded") == 1
    assert [p.pid for p in actors(ray_processes(child))] == [actor.pid]
    assert f"[ray worker pid {actor.pid}] INFO renderfarm.fastvideo.cpu: FastVideo CPU-compatibility layer" in (
        worker.log
    )
    assert sorted(o.object_name for o in videos_in(s3, bucket)) == sorted([first["key"], second["key"]])
    assert list(Path(worker_env["SPOOL_DIR"]).rglob("*.mp4")) == []

    # Warm shutdown: the engine shuts Ray down; nothing of the worker's session is left.
    stop_leaves_nothing(worker)
    assert "Ray shut down in pid" in worker.log


def test_pool_child_killed_mid_render_takes_its_ray_instance_along(start_worker, producer: Celery, s3, bucket):
    worker = start_worker(**RAY)
    session = worker.proc.pid
    [child] = worker.pool_children()
    old_ray = ray_processes(child)
    [actor] = actors(old_ray)
    daemons = [p for p in child.children() if p in old_ray]  # gcs_server, raylet, monitors: Ray's fate-sharing
    result = producer.send_task("tasks.render", kwargs=SLOW, queue="render")
    wait_for_denoising(result)
    os.kill(child.pid, signal.SIGKILL)

    wait_gone([actor.pid, *(p.pid for p in daemons)], timeout=15)
    done = result.get(timeout=300)  # redelivered to the replacement child, which started its own Ray
    assert done["worker_pid"] != child.pid and done["engine"] == "fastvideo"
    assert worker.log.count("engine loaded") == 2
    assert [o.object_name for o in videos_in(s3, bucket)] == [done["key"]]
    # Ray's two agents wait up to 60 s to report their raylet's death to the dead GCS, then exit.
    wait_gone([p.pid for p in old_ray], timeout=120)
    [new_child] = worker.pool_children()
    assert len(actors(ray_processes(new_child))) == 1
    descendants = {p.pid for p in worker.descendants()} | {worker.proc.pid}
    assert [p for p in session_processes(session) if p.pid not in descendants] == []


def test_soft_time_limit_rebuilds_the_generator_in_the_same_ray_instance(start_worker, producer: Celery):
    worker = start_worker(RENDER_SOFT_TIME_LIMIT_S="5", RENDER_TIME_LIMIT_S="300", **RAY)
    [child] = worker.pool_children()
    [actor] = actors(ray_processes(child))
    slow = {**SLOW, "height": 256, "width": 256, "num_frames": 65, "num_inference_steps": 200}
    with pytest.raises(Exception, match="soft time limit of 5s") as info:
        producer.send_task("tasks.render", kwargs=slow, queue="render").get(timeout=300)
    assert type(info.value).__name__ == "RenderTimeout"
    wait_gone([actor.pid], timeout=30)  # the busy actor was killed, not left rendering

    # A fresh generator in the same Ray instance: the old placement group was released for it.
    done = producer.send_task("tasks.render", kwargs=SMALL, queue="render").get(timeout=300)
    assert done["engine"] == "fastvideo" and done["worker_pid"] == child.pid
    assert worker.log.count("engine loaded") == 1 and "rebuilding the generator" in worker.log
    assert worker.log.count("Ray started in pid") == 1
    assert len(actors(ray_processes(child))) == 1


def test_a_dead_ray_worker_gets_one_more_try_then_a_clear_error_and_the_child_keeps_serving(
    start_worker, producer: Celery, s3, bucket
):
    worker = start_worker(**RAY)
    [child] = worker.pool_children()
    [actor] = actors(ray_processes(child))

    # Killed once (the kernel's out-of-memory killer, a crash): rebuilt, tried again, done once.
    result = producer.send_task("tasks.render", kwargs=SLOW, queue="render")
    wait_for_denoising(result)
    os.kill(actor.pid, signal.SIGKILL)
    done = result.get(timeout=300)
    assert done["worker_pid"] == child.pid and done["engine"] == "fastvideo"
    assert "FastVideo's Ray worker died during the render" in worker.log and "trying once more" in worker.log
    assert worker.log.count("engine loaded") == 1  # the pool child kept its process and its Ray instance
    assert [o.object_name for o in videos_in(s3, bucket)] == [done["key"]]
    second = new_actor(child, replacing=actor)

    # Killed on the retry too: a clear, final error; no loop, no redelivery, the child serves on.
    long = {**SLOW, "height": 256, "width": 256, "num_frames": 65, "num_inference_steps": 200, "seed": 12}
    doomed = producer.send_task("tasks.render", kwargs=long, queue="render")
    wait_for_denoising(doomed)
    os.kill(second.pid, signal.SIGKILL)
    wait_for(lambda: worker.log.count("trying once more") == 2, 120, "the second try")
    os.kill(new_actor(child, replacing=second).pid, signal.SIGKILL)
    with pytest.raises(Exception, match=r"Ray worker process died twice rendering 256x256 x 65 frames") as info:
        doomed.get(timeout=300)
    assert type(info.value).__name__ == "EngineWorkerLost"
    assert "this worker keeps serving" in str(info.value)

    after = producer.send_task("tasks.render", kwargs=SMALL, queue="render").get(timeout=300)
    assert after["worker_pid"] == child.pid and worker.log.count("engine loaded") == 1


def test_a_ray_executor_that_cannot_place_its_workers_stops_in_time_with_the_diagnosis_and_falls_back_or_exits(
    start_worker, producer: Celery
):
    # The operator named an address Ray's node does not have (TEST-NET-3): FastVideo's placement group
    # asks for a node there, which never comes. The start gives up after FASTVIDEO_RAY_START_TIMEOUT_S.
    nowhere = {**RAY, "FASTVIDEO_HOST_IP": "203.0.113.7", "FASTVIDEO_RAY_START_TIMEOUT_S": "3"}
    exits = start_worker(wait=False, ENGINE_FALLBACKS="none", **nowhere)
    falls_back = start_worker(ENGINE_FALLBACKS="diffusers", **nowhere)  # ready: it loaded the diffusers engine

    diagnosis = (
        r"FastVideo's Ray executor did not start: its placement group \[\{'GPU': 1.0, 'node:203.0.113.7': 0.001\}\] "
        r"was not ready after 3 s \(FASTVIDEO_RAY_START_TIMEOUT_S\)\. FastVideo asks for a node at 203.0.113.7 "
        r"\(FASTVIDEO_HOST_IP=203.0.113.7, set by the operator\) but Ray's node address is (\S+): no node has "
        r"203.0.113.7\. Fix: unset FASTVIDEO_HOST_IP \(the worker then uses Ray's node address\) or set it to (\S+)\."
    )
    for worker in (exits, falls_back):
        if worker is exits:
            assert worker.proc.wait(120) == 1  # exited with the diagnosis, never ready
        log = worker.log
        assert "is not the address of this process's Ray node" in log  # said at once, before the wait
        [(node, fix)] = re.findall(diagnosis, log)[:1]
        assert node == fix and f"'node:{node}': 1.0" in log  # the address Ray's node really has
        assert "Ray shut down in pid" in log and "Exception ignored" not in log

    assert "ENGINE_FALLBACKS=none allows no other engine here" in exits.log and "engine loaded" not in exits.log
    assert "renderfarm worker: FATAL: the engine failed to load" in exits.log
    wait_for(lambda: not session_processes(exits.proc.pid), 30, "the exited worker's Ray processes to end")

    assert "fallback to the diffusers engine. Cause: FastVideo's Ray executor did not start" in falls_back.log
    assert "engine loaded: engine=diffusers" in falls_back.log
    done = producer.send_task("tasks.render", kwargs=SMALL, queue="render").get(timeout=180)
    assert done["engine"] == "diffusers" and done["worker"] == falls_back.hostname
