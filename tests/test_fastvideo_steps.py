"""FastVideo renders step by step (tasks/engines/fastvideo_steps.py), in real workers, with both executors.

Per-step progress and events, cancel at a step and after the last one (before decoding),
out-of-memory inside FastVideo's own worker and the peak memory measured there. Run in
.venv-fastvideo (``make test-fastvideo``); skipped elsewhere.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
from celery import Celery

from tasks.cancel import Outcome, cancel
from tests.fastvideo_support import command_line, fastvideo_workers, ray_processes
from tests.support import PACED, free_port, render_too_big_for, uncap, videos_in, wait_for, watch_events
from tests.test_monitoring import scrape, value

try:
    import fastvideo  # noqa: F401
except ImportError:
    pytest.skip("fastvideo is not installed in this venv: see tests/test_fastvideo.py", allow_module_level=True)

pytestmark = pytest.mark.timeout(600)

EXECUTORS = ["mp", "ray"]
MIB = 2**20


def start_fastvideo(start_worker, executor: str, **env: str):
    port = free_port()
    worker = start_worker(
        ENGINE="fastvideo", DISTRIBUTED_EXECUTOR_BACKEND=executor, METRICS_PORT=str(port), METRICS_ADDR="127.0.0.1",
        **env,
    )  # fmt: skip
    return worker, port


def model_process(worker, executor: str) -> psutil.Process:
    """The process that runs FastVideo's model: the mp executor's spawned worker, or the Ray actor."""
    if executor == "mp":
        [process] = fastvideo_workers(worker)
        return process
    [child] = worker.pool_children()
    [actor] = [p for p in ray_processes(child) if "RayWorkerWrapper" in command_line(p)]
    return actor


@pytest.mark.parametrize("executor", EXECUTORS)
def test_every_denoising_step_reaches_the_task_state_events_and_metrics(start_worker, producer: Celery, executor):
    worker, port = start_fastvideo(start_worker, executor)
    steps = 200
    request = {"prompt": "steps", "height": 128, "width": 128, "num_frames": 33, "num_inference_steps": steps}
    infos: list[dict] = []
    events: list[dict] = []
    with watch_events(producer, {"task-progress": events.append}):
        result = producer.send_task("tasks.render", kwargs=request, queue="render")
        while not result.ready():
            info = result.info
            if result.state == "PROGRESS" and isinstance(info, dict) and (not infos or infos[-1] != info):
                infos.append(info)
            time.sleep(0.02)
        done = result.get(timeout=10)

    denoising = [info["step"] for info in infos if info.get("stage") == "denoising"]
    assert all(info["steps"] == steps for info in infos if info.get("stage") == "denoising")
    assert denoising == sorted(set(denoising)), denoising  # rising, each step once
    assert len([s for s in denoising if 0 < s < steps]) >= 5, denoising  # not just the first and the last
    # Updates go out at most every 0.1 s, the latest winning: a decoding shorter than that may be superseded.
    assert {"stage": "decoding"} in infos or done["timings"]["decoding"] < 0.2
    event_steps = [e["step"] for e in events if e["uuid"] == result.id and e["stage"] == "denoising"]
    assert len([s for s in event_steps if 0 < s < steps]) >= 5 and event_steps == sorted(set(event_steps))

    assert done["timings"]["denoising"] > 0 and done["timings"]["decoding"] > 0
    samples = scrape(port)
    for stage in ("encoding_prompt", "denoising", "decoding"):
        assert value(samples, "renderfarm_render_stage_seconds_count", stage=stage) == 1, stage

    # Peak memory is measured where the model runs: FastVideo's own worker process, not the pool process.
    runner = model_process(worker, executor)
    assert done["memory_source"] == "rss"
    assert done["peak_memory_mb"] >= 0.8 * runner.memory_info().rss / MIB
    assert value(samples, "renderfarm_render_peak_memory_bytes", source="rss") == done["peak_memory_mb"] * MIB


@pytest.mark.parametrize("executor", EXECUTORS)
def test_cancel_stops_a_fastvideo_render_at_a_step_and_the_same_worker_serves_on(
    start_worker, producer: Celery, worker_env, s3, bucket, executor
):
    worker, port = start_fastvideo(start_worker, executor, **PACED)  # paced: a render can be held (tests/pacing.py)
    [child] = worker.pool_children()
    runner = model_process(worker, executor)
    steps = 200  # about 40 s of denoising on 2 CPU cores: only a cancel ends it early
    request = {"prompt": "cancel me", "height": 256, "width": 256, "num_frames": 65, "num_inference_steps": steps}
    running = producer.send_task("tasks.render", kwargs=request, queue="render")
    wait_for(lambda: running.state == "PROGRESS" and (running.info or {}).get("step", 0) >= 2, 180, "denoising")

    cancel(running.id, producer)
    wait_for(lambda: running.state == "REVOKED", 60, "the render to stop")
    assert "cancelled by request during stage 'denoising'" in str(running.info)
    # FastVideo's worker says where it stopped (a Ray actor's lines reach the worker log a little later).
    marker = "stopped by the pool process after step "
    wait_for(lambda: marker in worker.log, 30, "FastVideo's worker to log where it stopped")
    stopped_after = int(worker.log.split(marker)[1].split()[0].rstrip(":"))
    assert 2 <= stopped_after < steps and "FastVideo forward ended early" in worker.log
    # Nothing of it anywhere: no object, no file in FastVideo's output directory or the spool.
    assert [path for path in Path(worker_env["SPOOL_DIR"]).rglob("*") if path.is_file()] == []
    assert list(videos_in(s3, bucket)) == []

    # Cancelled after its last denoising step: FastVideo's worker waits for the pool process's word
    # there, and stops without decoding (held at that point until the cancel is seen).
    late = producer.send_task("tasks.render", kwargs={"prompt": "late, hold at denoised", "num_inference_steps": 3},
                              queue="render")  # fmt: skip
    wait_for(lambda: f"holding {late.id} at denoised" in worker.log, 180, "the last denoising step")
    outcome = cancel(late.id, producer, wait_s=60)
    assert (outcome.outcome, outcome.stage, outcome.before) == (Outcome.STOPPED, "decoding", True), outcome
    wait_for(lambda: worker.log.count(marker) == 2, 30, "FastVideo's worker to log where it stopped")
    assert int(worker.log.split(marker)[2].split()[0].rstrip(":")) == 3  # after the last step: no decoding
    assert [path for path in Path(worker_env["SPOOL_DIR"]).rglob("*") if path.is_file()] == []
    # Cancelled while decoding: the MP4 FastVideo's worker wrote is dropped before encoding (moving it) begins.
    later = producer.send_task("tasks.render", kwargs={"prompt": "later, hold at decoding", "num_inference_steps": 3},
                               queue="render")  # fmt: skip
    wait_for(lambda: f"holding {later.id} at decoding" in worker.log, 180, "decoding")
    outcome = cancel(later.id, producer, wait_s=60)
    assert (outcome.outcome, outcome.stage, outcome.before) == (Outcome.STOPPED, "encoding", True), outcome
    assert [path for path in Path(worker_env["SPOOL_DIR"]).rglob("*") if path.is_file()] == []
    assert list(videos_in(s3, bucket)) == []

    after = producer.send_task("tasks.render", kwargs={"prompt": "after the cancel"}, queue="render").get(timeout=180)
    assert after["worker_pid"] == child.pid and worker.log.count("engine loaded") == 1
    assert model_process(worker, executor).pid == runner.pid  # FastVideo's worker too: no rebuild
    samples = scrape(port)
    assert value(samples, "renderfarm_model_load_seconds_count", model="tiny-wan", engine="fastvideo") == 1
    assert value(samples, "renderfarm_renders_total", outcome="cancelled") == 3


@pytest.mark.parametrize("executor", EXECUTORS)
def test_out_of_memory_in_fastvideos_worker_is_retried_once_then_fails_naming_the_size(
    start_worker, producer: Celery, executor
):
    worker, _ = start_fastvideo(start_worker, executor)
    [child] = worker.pool_children()
    runner = model_process(worker, executor)
    error = render_too_big_for(runner, producer)  # the address space of the process that runs the model, capped
    assert "out of memory in FastVideo's worker process" in str(error)
    assert worker.log.count("freeing memory and trying once more") == 1  # one bounded retry, no loop
    assert "SIGQUIT" not in worker.log and "WorkerLostError" not in worker.log  # no death, no redelivery

    uncap(runner)
    after = producer.send_task("tasks.render", kwargs={"prompt": "fits"}, queue="render").get(timeout=180)
    assert after["worker_pid"] == child.pid and worker.log.count("engine loaded") == 1
    assert model_process(worker, executor).pid == runner.pid


def test_two_ranks_render_in_sequence_parallel_and_stop_at_the_same_step(
    start_worker, producer: Celery, worker_env, s3, bucket
):
    """``NUM_GPUS=2``, a worker spread over two GPUs: FastVideo's mp executor starts two ranks that
    split each denoising step's sequence between them (sequence parallelism, ``sp_size`` =
    ``num_gpus``), here over gloo on the CPU. Both ranks stop at the same step when the render is
    cancelled (they agree by an all-reduce), and serve the next render without a rebuild."""
    worker, _ = start_fastvideo(start_worker, "mp", NUM_GPUS="2")
    ranks = fastvideo_workers(worker)
    assert len(ranks) == 2
    done = producer.send_task("tasks.render", kwargs={"prompt": "two ranks", "height": 64, "width": 96},
                              queue="render").get(timeout=180)  # fmt: skip
    assert (done["engine"], done["width"], done["height"]) == ("fastvideo", 96, 64)

    request = {"prompt": "cancel two ranks", "height": 128, "width": 128, "num_frames": 33, "num_inference_steps": 200}
    running = producer.send_task("tasks.render", kwargs=request, queue="render")
    wait_for(lambda: running.state == "PROGRESS" and (running.info or {}).get("step", 0) >= 2, 180, "denoising")
    cancel(running.id, producer)
    wait_for(lambda: running.state == "REVOKED", 60, "the render to stop")
    marker = "stopped by the pool process after step "
    wait_for(lambda: worker.log.count("FastVideo forward ended early") == 2, 30, "both ranks to stop")
    stopped = {int(part.split()[0].rstrip(":")) for part in worker.log.split(marker)[1:]}
    assert len(stopped) == 1 and 2 <= stopped.pop() < 200  # the same step on both ranks
    assert [o.object_name for o in videos_in(s3, bucket)] == [done["key"]]  # nothing of the cancelled one

    after = producer.send_task("tasks.render", kwargs={"prompt": "after", "seed": 2}, queue="render").get(timeout=180)
    assert after["worker_pid"] == done["worker_pid"] and worker.log.count("engine loaded") == 1
    assert sorted(p.pid for p in fastvideo_workers(worker)) == sorted(p.pid for p in ranks)
