"""Prometheus metrics from a worker, served by its main process on ``METRICS_PORT`` (0 = off).

Renders run in a prefork pool child that Celery may replace (a crash, ``WORKER_MAX_TASKS_PER_CHILD``),
so the metrics use prometheus_client's multiprocess mode: at ``worker_init`` the main process
makes a fresh directory (``PROMETHEUS_MULTIPROC_DIR``), creates the metrics and starts the HTTP
server, all before any pool child forks. Each process (the main one and every pool child, old or
new) writes its samples to its own files there; a scrape sums them, so counts survive a child's
replacement. The directory is removed at ``worker_shutdown``. The queue depth is read from Redis
at scrape time by the main process (``LLEN`` of every priority list of each queue it consumes).

Recorded from Celery signals only (the task itself knows nothing of metrics):

- ``renderfarm_render_stage_seconds{stage}`` histogram: the result's ``timings`` per stage.
- ``renderfarm_render_seconds{outcome}`` histogram and ``renderfarm_renders_total{outcome}``:
  outcome is success, cached, invalid, timeout, cancelled, storage, delivery_limit, out_of_memory
  or error.
- ``renderfarm_render_retries_total{reason}``: renders sent back to the queue to try again.
- ``renderfarm_renders_requeued_total{queue,reason}``: renders given back to their queue untouched
  by a process with no engine (``reason="no_engine"``, ``tasks.pipeline.stray``): never a failure,
  but a worker consumed a render queue it cannot serve; and renders a worker shutting down gave
  back with a checkpoint (``reason="shutdown"``, the pipeline's ``render_handed_back``).
- ``renderfarm_render_peak_memory_bytes{source}``: the last render's peak (``cuda`` or ``rss``).
- ``renderfarm_model_load_seconds{model,engine}`` histogram: one sample per pool child's load.
- ``renderfarm_webhook_deliveries_total{outcome}``: delivered, retried, failed.
- ``renderfarm_queue_depth{queue}`` gauge: messages waiting, the autoscaling signal;
  ``renderfarm_broker_up`` is 0 when Redis did not answer the scrape.
- ``renderfarm_denoising_steps_total``: denoising steps computed (the pipeline's ``denoised``).
- Checkpoints (the pipeline's ``checkpointed``): ``renderfarm_checkpoints_total{outcome}``
  (written, skipped, failed), ``renderfarm_checkpoints_ignored_total{reason}`` (mismatch, damaged,
  unreadable), ``renderfarm_checkpoint_save_seconds`` histogram and ``renderfarm_checkpoint_bytes``
  (the last one's size), ``renderfarm_render_resumes_total`` and
  ``renderfarm_denoising_steps_saved_total`` (steps a resume did not compute again).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

from celery import signals

from tasks.engines.holder import ENGINE
from tasks.pipeline.events import (
    checkpointed,
    denoised,
    render_cancelled,
    render_given_back,
    render_handed_back,
    render_stored,
)
from tasks.worker.queues import serves_renders
from worker_config.celery_config import priority_lists
from worker_config.redis_link import redis_client
from worker_config.routing import RENDER_TASK
from worker_config.settings import get_settings

__all__ = ["install", "outcome_of", "OUTCOMES", "CHECKPOINT_OUTCOMES", "RENDER_TASK", "WEBHOOK_TASK"]

log = logging.getLogger("renderfarm.metrics")
WEBHOOK_TASK = "tasks.deliver_webhook"
OUTCOMES = (
    "success", "cached", "invalid", "timeout", "cancelled", "storage", "delivery_limit", "out_of_memory", "error",
)  # fmt: skip
CHECKPOINT_OUTCOMES = ("written", "skipped", "failed")
_IGNORED_REASONS = ("mismatch", "damaged", "unreadable")
_SAVE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_RENDER_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900)


class _Metrics:
    """The metric objects; created once in the main process, inherited by every forked pool child."""

    def __init__(self, model: str, renders: bool = True) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.model = model  # every render series carries the worker's model (MODEL_ID)

        self.stage_seconds = Histogram(
            "renderfarm_render_stage_seconds",
            "Seconds a render spent in each stage",
            ["model", "stage"],
            buckets=_STAGE_BUCKETS,
        )
        self.render_seconds = Histogram(
            "renderfarm_render_seconds", "Seconds per render, by outcome", ["model", "outcome"], buckets=_RENDER_BUCKETS
        )
        self.renders = Counter(
            "renderfarm_renders", "Renders finished, by outcome or failure reason", ["model", "outcome"]
        )
        self.retries = Counter(
            "renderfarm_render_retries", "Renders sent back to try again, by reason", ["model", "reason"]
        )
        self.peak_memory = Gauge(
            "renderfarm_render_peak_memory_bytes",
            "Peak memory of the last render (cuda: torch's allocator; rss: the pool process)",
            ["source"],
            multiprocess_mode="mostrecent",
        )
        self.model_load = Histogram(
            "renderfarm_model_load_seconds", "Seconds to load the model in a pool process", ["model", "engine"],
            buckets=_LOAD_BUCKETS,
        )  # fmt: skip
        self.requeued = Counter(
            "renderfarm_renders_requeued",
            "Renders given back to their queue: untouched by a process that cannot run them (no_engine), or with "
            "a checkpoint by a worker shutting down (shutdown)",
            ["queue", "reason"],
        )
        self.webhooks = Counter("renderfarm_webhook_deliveries", "Webhook delivery attempts, by outcome", ["outcome"])
        self.steps = Counter("renderfarm_denoising_steps", "Denoising steps computed", ["model"])
        self.checkpoints = Counter(
            "renderfarm_checkpoints", "Checkpoint saves: written, skipped (the last one still saving), failed",
            ["model", "outcome"],
        )  # fmt: skip
        self.ignored = Counter(
            "renderfarm_checkpoints_ignored", "Checkpoints found but not used, by reason", ["model", "reason"]
        )
        self.save_seconds = Histogram(
            "renderfarm_checkpoint_save_seconds", "Seconds to copy, encode and upload a checkpoint", ["model"],
            buckets=_SAVE_BUCKETS,
        )  # fmt: skip
        self.checkpoint_bytes = Gauge(
            "renderfarm_checkpoint_bytes", "Size of the last checkpoint written", ["model"],
            multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.resumes = Counter("renderfarm_render_resumes", "Renders continued from a checkpoint", ["model"])
        self.steps_saved = Counter(
            "renderfarm_denoising_steps_saved", "Denoising steps a resume did not compute again", ["model"]
        )
        for outcome in OUTCOMES if renders else ():  # a render worker's series exist from the first scrape, at 0
            self.renders.labels(model, outcome)
        for outcome in CHECKPOINT_OUTCOMES if renders else ():
            self.checkpoints.labels(model, outcome)
        for reason in _IGNORED_REASONS if renders else ():
            self.ignored.labels(model, reason)
        for counter in (self.steps, self.resumes, self.steps_saved) if renders else ():
            counter.labels(model)


class _QueueDepth:
    """A custom collector: the depth of each queue, read from Redis at scrape time."""

    def __init__(self, client: Any, queues: list[str], sep: str, steps: list[int]) -> None:
        self._client = client
        self._keys = {q: priority_lists(q, sep, steps) for q in queues}

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily("renderfarm_queue_depth", "Messages waiting in each queue", labels=["queue"])
        up = GaugeMetricFamily("renderfarm_broker_up", "1 if Redis answered this scrape")
        try:
            pipe = self._client.pipeline(transaction=False)
            for keys in self._keys.values():
                for key in keys:
                    pipe.llen(key)
            sizes = iter(pipe.execute())
            for queue, keys in self._keys.items():
                depth.add_metric([queue], sum(next(sizes) for _ in keys))
            up.add_metric([], 1)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because Redis is away
            log.warning("queue depth unavailable: %s", exc)
            up.add_metric([], 0)
        yield depth
        yield up


_M: _Metrics | None = None
_DIR: str | None = None
_SERVER: Any = None
_STARTED: dict[str, float] = {}
_ANNOUNCE = ""


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _M, _DIR, _SERVER, _ANNOUNCE
    settings = get_settings()
    if not settings.METRICS_PORT:
        return
    _DIR = tempfile.mkdtemp(prefix="renderfarm-metrics-")
    # Before any metric exists or any pool child forks: every process writes its own files here.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _DIR
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server, values

    if values.ValueClass is values.MutexValue:  # imported earlier without the directory set
        values.ValueClass = values.MultiProcessValue()
    _M = _Metrics(settings.MODEL_ID, renders=serves_renders())  # after tasks.worker.queues decided it
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=_DIR)
    conf = sender.app.conf
    transport = conf.broker_transport_options or {}
    queues = sorted(sender.app.amqp.queues.consume_from or {conf.task_default_queue: None})
    registry.register(
        _QueueDepth(
            redis_client(settings, timeout_s=2, connect_timeout_s=2),
            queues,
            transport.get("sep", "\x06\x16"),
            transport.get("priority_steps", [0]),
        )
    )
    try:
        _SERVER, _thread = start_http_server(settings.METRICS_PORT, addr=settings.METRICS_ADDR, registry=registry)
    except OSError as exc:
        print(f"renderfarm worker: cannot serve metrics on {settings.METRICS_ADDR}:{settings.METRICS_PORT} "
              f"(METRICS_PORT): {exc}", flush=True)  # fmt: skip
        raise SystemExit(2) from None
    _ANNOUNCE = (
        f"metrics on http://{settings.METRICS_ADDR}:{settings.METRICS_PORT}/metrics (queues {', '.join(queues)})"
    )


def _on_worker_ready(**_: Any) -> None:
    if _ANNOUNCE:  # logging is set up after worker_init: say it now
        log.info("%s", _ANNOUNCE)


def _on_worker_shutdown(**_: Any) -> None:
    if _SERVER is not None:
        _SERVER.shutdown()
    if _DIR is not None:
        shutil.rmtree(_DIR, ignore_errors=True)


def _on_process_init(**_: Any) -> None:
    # Connected after tasks.worker.lifecycle's handler, so the engine has loaded by now.
    if _M is None or not ENGINE.ready or ENGINE.load_seconds is None:
        return
    engine = ENGINE.get()
    _M.model_load.labels(engine.model_id, engine.name).observe(ENGINE.load_seconds)


def outcome_of(exc: BaseException | None) -> str:
    """The failure reason label of an exception raised by ``tasks.render``."""
    from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

    from tasks.errors import (
        DeliveryLimitExceeded,
        InvalidRequest,
        RenderOutOfMemory,
        RenderTimeout,
        StorageUnavailable,
    )

    if isinstance(exc, InvalidRequest):
        return "invalid"
    if isinstance(exc, RenderTimeout | SoftTimeLimitExceeded | TimeLimitExceeded):
        return "timeout"
    if isinstance(exc, StorageUnavailable):
        return "storage"
    if isinstance(exc, DeliveryLimitExceeded):
        return "delivery_limit"
    if isinstance(exc, RenderOutOfMemory):
        return "out_of_memory"
    return "error"


def _task_name(sender: Any) -> str | None:
    return getattr(sender, "name", None)


def _on_prerun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if _M is not None and task_id and _task_name(sender) == RENDER_TASK:
        _STARTED[task_id] = time.perf_counter()


def _elapsed(task_id: str | None) -> float | None:
    started = _STARTED.pop(task_id or "", None)
    return None if started is None else time.perf_counter() - started


def _on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if _M is None:
        return
    name = _task_name(sender)
    if name == WEBHOOK_TASK:
        _M.webhooks.labels("delivered").inc()
        return
    if name != RENDER_TASK or not isinstance(result, dict):
        return
    _elapsed(sender.request.id)
    _observe_render(result)


def _on_render_stored(sender: Any = None, task_id: str | None = None, result: Any = None, **_: Any) -> None:
    """Buffer mode: the render's upload finished in the background (no ``task_success``)."""
    if _M is not None and isinstance(result, dict):
        _elapsed(task_id)
        _observe_render(result)


def _observe_render(result: dict[str, Any]) -> None:
    assert _M is not None
    outcome = "cached" if result.get("cached") else "success"
    timings = result.get("timings") or {}
    for stage, seconds in timings.items():
        if stage != "total":
            _M.stage_seconds.labels(_M.model, stage).observe(float(seconds))
    _M.renders.labels(_M.model, outcome).inc()
    if "total" in timings:
        _M.render_seconds.labels(_M.model, outcome).observe(float(timings["total"]))
    if result.get("peak_memory_mb") is not None:
        source = str(result.get("memory_source") or "unknown")
        _M.peak_memory.labels(source).set(float(result["peak_memory_mb"]) * 1024 * 1024)


def _on_failure(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None, **_: Any
) -> None:
    if _M is None:
        return
    name = _task_name(sender)
    if name == WEBHOOK_TASK:
        _M.webhooks.labels("failed").inc()
        return
    if name != RENDER_TASK:
        return
    outcome = outcome_of(exception)
    _M.renders.labels(_M.model, outcome).inc()
    if (seconds := _elapsed(task_id)) is not None:
        _M.render_seconds.labels(_M.model, outcome).observe(seconds)


def _on_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
    if _M is None:
        return
    name = _task_name(sender)
    if name == WEBHOOK_TASK:
        _M.webhooks.labels("retried").inc()
    elif name == RENDER_TASK:
        _M.retries.labels(_M.model, outcome_of(reason if isinstance(reason, BaseException) else None)).inc()


def _on_given_back(sender: Any = None, queue: str | None = None, reason: str | None = None, **_: Any) -> None:
    if _M is not None:
        _M.requeued.labels(queue or "?", reason or "?").inc()


def _on_postrun(sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    if state == "REJECTED":  # given back to its queue (tasks.pipeline.stray, or a shutdown): it runs elsewhere
        _elapsed(task_id)
        return
    # A render that ended with Ignore (cancelled: counted by render_cancelled; or handed to buffer
    # mode's background upload: counted when stored) is not timed from here on.
    if _M is not None and _task_name(sender) == RENDER_TASK and state == "IGNORED":
        _elapsed(task_id)


def _on_handed_back(sender: Any = None, queue: str | None = None, **_: Any) -> None:
    if _M is not None:
        _M.requeued.labels(queue or "?", "shutdown").inc()


def _on_render_cancelled(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    # Stopped while it ran, or by buffer mode's background thread before its upload.
    if _M is not None:
        _M.renders.labels(_M.model, "cancelled").inc()
        if (seconds := _elapsed(task_id)) is not None:
            _M.render_seconds.labels(_M.model, "cancelled").observe(seconds)


def _on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    # A queued render cancelled before it started: discarded by the main process.
    if _M is not None and _task_name(sender) == RENDER_TASK:
        _M.renders.labels(_M.model, "cancelled").inc()


def _on_denoised(sender: Any = None, steps: int = 0, **_: Any) -> None:
    if _M is not None:
        _M.steps.labels(_M.model).inc(steps)


def _on_checkpointed(sender: Any = None, outcome: str = "", **info: Any) -> None:
    if _M is None:
        return
    if outcome in CHECKPOINT_OUTCOMES:
        _M.checkpoints.labels(_M.model, outcome).inc()
        if outcome == "written":
            _M.save_seconds.labels(_M.model).observe(float(info.get("seconds") or 0.0))
            _M.checkpoint_bytes.labels(_M.model).set(float(info.get("nbytes") or 0))
    elif outcome == "ignored":
        _M.ignored.labels(_M.model, str(info.get("reason"))).inc()
    elif outcome == "resumed":
        _M.resumes.labels(_M.model).inc()
        _M.steps_saved.labels(_M.model).inc(int(info.get("steps") or 0))


def install(app: Any) -> None:
    """Connect the metric hooks; they do nothing unless METRICS_PORT is set in a worker."""
    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_ready.connect(_on_worker_ready, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
    signals.worker_process_init.connect(_on_process_init, weak=False)
    signals.task_prerun.connect(_on_prerun, weak=False)
    signals.task_success.connect(_on_success, weak=False)
    render_stored.connect(_on_render_stored, weak=False)
    render_given_back.connect(_on_given_back, weak=False)
    render_handed_back.connect(_on_handed_back, weak=False)
    render_cancelled.connect(_on_render_cancelled, weak=False)
    denoised.connect(_on_denoised, weak=False)
    checkpointed.connect(_on_checkpointed, weak=False)
    signals.task_failure.connect(_on_failure, weak=False)
    signals.task_retry.connect(_on_retry, weak=False)
    signals.task_postrun.connect(_on_postrun, weak=False)
    signals.task_revoked.connect(_on_revoked, weak=False)
