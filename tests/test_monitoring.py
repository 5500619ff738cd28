"""Monitoring through real workers: Prometheus metrics scraped over HTTP, task ids in the logs."""

from __future__ import annotations

import json
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support import PACED, free_port, wait_for, watch_events

SMALL = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 1}
SLOW = {"num_frames": 9, "height": 64, "width": 64, "num_inference_steps": 30}  # paced: 3 s or more
WATCHED = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 6}  # paced: 0.6 s or more
STAGE_ORDER = ["validating", "checking_cache", "encoding_prompt", "denoising", "decoding", "encoding", "uploading"]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (e.g. every model's)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= set(have))


def send(producer, **kwargs):
    return producer.send_task("tasks.render", kwargs=kwargs, queue="render")


def started(result) -> bool:
    return result.state in ("STARTED", "PROGRESS")


def test_metrics_endpoint_counts_renders_by_outcome_stage_and_queue_depth(start_worker, producer):
    port = free_port()
    start_worker(METRICS_PORT=str(port), METRICS_ADDR="127.0.0.1", **PACED)
    before = scrape(port)
    assert value(before, "renderfarm_renders_total", outcome="success") == 0
    assert value(before, "renderfarm_queue_depth", queue="render") == 0
    assert value(before, "renderfarm_broker_up") == 1
    # The pool process loaded the model once, before any render.
    assert value(before, "renderfarm_model_load_seconds_count", model="tiny-wan", engine="diffusers") == 1
    assert value(before, "renderfarm_model_load_seconds_sum", model="tiny-wan", engine="diffusers") > 0

    slow = send(producer, prompt="a slow one", seed=1, **SLOW)
    wait_for(lambda: started(slow), 60, "the slow render to start")
    queued = [send(producer, prompt="queued", seed=seed, **SMALL) for seed in (2, 3)]
    during = scrape(port)
    assert value(during, "renderfarm_queue_depth", queue="render") == 2  # the autoscaling signal

    for result in (slow, *queued):
        result.get(timeout=120)
    again = send(producer, prompt="queued", seed=2, **SMALL).get(timeout=60)  # same request: from storage
    assert again["cached"] is True
    invalid = send(producer, prompt="bad frames", num_frames=8)
    wait_for(lambda: invalid.state == "FAILURE", 30, "the invalid request to fail")

    def counted() -> dict | None:
        samples = scrape(port)
        return samples if value(samples, "renderfarm_renders_total", outcome="invalid") == 1 else None

    after = wait_for(counted, 10, "the invalid render to be counted")
    assert value(after, "renderfarm_renders_total", outcome="success") == 3
    assert value(after, "renderfarm_renders_total", outcome="cached") == 1
    assert value(after, "renderfarm_renders_total", outcome="error") == 0
    assert value(after, "renderfarm_queue_depth", queue="render") == 0
    # Every stage of the three fresh renders is in the histogram, with the seconds the results report.
    for stage in ("validating", "checking_cache", "encoding_prompt", "denoising", "decoding", "encoding", "uploading"):
        assert value(after, "renderfarm_render_stage_seconds_count", stage=stage) >= 3, stage
    assert value(after, "renderfarm_render_stage_seconds_sum", stage="denoising") >= slow.result["timings"]["denoising"]
    assert value(after, "renderfarm_render_seconds_count", outcome="success") == 3
    assert value(after, "renderfarm_render_seconds_count", outcome="invalid") == 1
    assert slow.result["memory_source"] == "rss"  # CPU render: the pool process's resident set
    assert value(after, "renderfarm_render_peak_memory_bytes", source="rss") > 0
    # Still one model load: no pool process was replaced.
    assert value(after, "renderfarm_model_load_seconds_count", model="tiny-wan", engine="diffusers") == 1


def test_buffer_mode_renders_are_counted_once_their_upload_finished(start_worker, producer):
    port = free_port()
    start_worker(METRICS_PORT=str(port), METRICS_ADDR="127.0.0.1", WORKER_MODE="buffer")
    for seed in (1, 2):
        send(producer, prompt="buffered", seed=seed, **SMALL).get(timeout=60)

    def both_counted() -> dict | None:
        samples = scrape(port)
        return samples if value(samples, "renderfarm_renders_total", outcome="success") == 2 else None

    samples = wait_for(both_counted, 10, "both background uploads to be counted")
    assert value(samples, "renderfarm_render_stage_seconds_count", stage="uploading") == 2


def test_metrics_survive_the_pool_process_being_replaced(start_worker, producer):
    port = free_port()
    worker = start_worker(METRICS_PORT=str(port), METRICS_ADDR="127.0.0.1", WORKER_MAX_TASKS_PER_CHILD="1")
    send(producer, prompt="first", seed=1, **SMALL).get(timeout=60)
    wait_for(lambda: value(scrape(port), "renderfarm_model_load_seconds_count", model="tiny-wan",
                           engine="diffusers") == 2, 60, "a second pool process to load the model")  # fmt: skip
    send(producer, prompt="second", seed=2, **SMALL).get(timeout=60)
    # The first pool process's count is kept after it exited (the signal fires just after the result is stored).
    wait_for(lambda: value(scrape(port), "renderfarm_renders_total", outcome="success") == 2, 10, "two successes")
    assert worker.proc.poll() is None


def test_metrics_are_off_by_default(start_worker, producer):
    worker = start_worker()
    send(producer, prompt="x", **SMALL).get(timeout=60)
    assert "metrics on http" not in worker.log and " ready." in worker.log


def test_json_logs_carry_the_task_id_on_every_line_of_a_render(start_worker, producer):
    from tests.test_webhooks import SECRET, Receiver

    hook = Receiver()  # the webhook hook logs through a plain logging logger, not Celery's task logger
    worker = start_worker(LOG_FORMAT="json", WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOWED_HOSTS="127.0.0.1:*")
    try:
        result = send(producer, prompt="a json line", webhook_url=hook.url, **SMALL)
        result.get(timeout=60)
        wait_for(lambda: hook.deliveries, 30, "the webhook")
    finally:
        hook.close()
    task_id = result.id
    wait_for(lambda: f"{task_id}] succeeded" in worker.log, 10, "the success line")
    lines = worker.log.splitlines()
    start = next(i for i, line in enumerate(lines) if task_id in line and "received" in line)
    end = next(i for i, line in enumerate(lines) if f"{task_id}] succeeded in" in line)
    # Every line in between is about this render, but for the main process receiving the webhook delivery task.
    render_lines = [json.loads(line) for line in lines[start : end + 1] if "tasks.deliver_webhook[" not in line]
    assert len(render_lines) >= 3
    assert {entry["task_id"] for entry in render_lines} == {task_id}
    loggers = {entry["logger"] for entry in render_lines}
    assert {"celery.worker.strategy", "tasks.render", "celery.app.trace"} <= loggers, loggers
    hooked = [json.loads(line) for line in lines if '"renderfarm.webhooks"' in line]
    assert hooked and all(entry["task_id"] == task_id for entry in hooked)
    assert all(set(entry) >= {"time", "level", "logger", "pid", "message"} for entry in render_lines)
    # Lines outside any task (start-up) are JSON too, without a task id.
    ready = next(json.loads(line) for line in lines if line.startswith("{") and " ready." in line)
    assert ready["task_id"] is None


def test_text_logs_tag_render_lines_with_the_task_id(start_worker, producer):
    worker = start_worker()
    result = send(producer, prompt="a text line", **SMALL)
    result.get(timeout=60)
    wait_for(lambda: f"{result.id}] succeeded" in worker.log, 10, "the success line")
    ours = [line for line in worker.log.splitlines() if "tasks.render: render tiny-wan" in line]
    assert ours and all(f"[{result.id}] tasks.render: " in line for line in ours)


def test_cancelled_renders_are_counted_once_each(start_worker, producer):
    from tasks.cancel import cancel

    port = free_port()
    start_worker(METRICS_PORT=str(port), METRICS_ADDR="127.0.0.1", **PACED)
    running = send(producer, prompt="cancel me while running", seed=1, **SLOW)
    queued = send(producer, prompt="cancel me while queued", seed=2, **SLOW)
    wait_for(lambda: running.state == "PROGRESS" and (running.info or {}).get("step", 0) >= 1, 120, "denoising")
    cancel(queued.id, producer)
    cancel(running.id, producer)
    wait_for(lambda: running.state == "REVOKED" and queued.state == "REVOKED", 60, "both cancels")
    send(producer, prompt="after", **SMALL).get(timeout=60)
    wait_for(lambda: value(scrape(port), "renderfarm_renders_total", outcome="success") == 1, 10, "the success")
    samples = scrape(port)
    assert value(samples, "renderfarm_renders_total", outcome="cancelled") == 2
    assert value(samples, "renderfarm_render_seconds_count", outcome="cancelled") == 1  # only the running one ran


def test_failure_reasons_map_the_error_hierarchy():
    from celery.exceptions import SoftTimeLimitExceeded

    from tasks import errors
    from tasks.worker.metrics import OUTCOMES, outcome_of

    cases = {
        errors.InvalidRequest("x"): "invalid",
        errors.RenderTimeout("x"): "timeout",
        SoftTimeLimitExceeded(): "timeout",
        errors.StorageUnavailable("x"): "storage",
        errors.DeliveryLimitExceeded("x"): "delivery_limit",
        errors.RenderOutOfMemory("x"): "out_of_memory",
        RuntimeError("x"): "error",
    }
    assert {type(e).__name__: outcome_of(e) for e in cases} == {type(e).__name__: o for e, o in cases.items()}
    assert set(cases.values()) | {"success", "cached", "cancelled"} == set(OUTCOMES)


def test_flower_sees_each_renders_stage_through_task_progress_events(start_worker, producer):
    start_worker(**PACED)
    state = producer.events.State()  # what Flower keeps, fed by the same events
    progress: list[dict] = []

    def on_event(event: dict) -> None:
        state.event(event)
        if event["type"] == "task-progress":
            progress.append(event)

    with watch_events(producer, {"*": on_event}):
        result = send(producer, prompt="watched", seed=9, **WATCHED)
        result.get(timeout=60)
        wait_for(
            lambda: (t := state.tasks.get(result.id)) is not None and t.state == "SUCCESS", 30, "the success event"
        )

    # Updates go out at most every 0.1 s, the latest winning (tasks/pipeline/progress.py): the paced steps
    # (0.1 s each) are seen; short stages may be superseded, by a later stage or by the final state.
    stages = [e["stage"] for e in progress if e["uuid"] == result.id]
    assert stages == sorted(stages, key=STAGE_ORDER.index) and "denoising" in stages
    steps = [e["step"] for e in progress if e["uuid"] == result.id and e["stage"] == "denoising"]
    assert len(steps) >= 3 and steps == sorted(set(steps))
    assert all(e["steps"] == WATCHED["num_inference_steps"] for e in progress if e["stage"] == "denoising")
    task = state.tasks[result.id]
    assert task.name == "tasks.render" and task.stage == stages[-1] and "watched" in task.kwargs
