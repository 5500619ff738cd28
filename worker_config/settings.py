"""Settings: the one place that reads the environment.

Every knob of the render farm is a field here, named exactly as its environment variable
(see docs/settings.md). Two objects, each built once per process:

- ``get_broker_settings()``: what every process that talks to the farm needs (producers, the
  CLI, Flower): where Redis is. A producer reads nothing else, so no worker setting can stop it.
- ``get_settings()``: a worker's settings, the broker's included (``Settings`` extends
  ``BrokerSettings``); only worker code calls it.

Everything else receives one of them or calls its getter. Invalid values fail with a message that
names the variable and what is allowed.
"""

from __future__ import annotations

import functools
import ipaddress
import tempfile
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, FilePath, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker_config.redis_link import check_url, is_sentinel, redacted
from worker_config.routing import queue_for

__all__ = [
    "BrokerSettings", "Settings", "SettingsError", "get_broker_settings", "get_settings", "endpoint_parts",
    "describe_errors",
]  # fmt: skip

_DEFAULT_CACHE = Path.home() / ".cache" / "renderfarm"
_S = TypeVar("_S", bound="BrokerSettings")
# Settings whose values an error message never repeats (REDIS_URL is shown without its password).
_SECRETS = frozenset({"REDIS_URL", "REDIS_SENTINEL_PASSWORD", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "WEBHOOK_SECRET"})


class SettingsError(ValueError):
    """The environment holds an invalid setting; the message names it and what is allowed."""


class BrokerSettings(BaseSettings):
    """What a producer reads: the broker and result backend."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True)

    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    # Redis Sentinel (REDIS_URL = sentinel://host:26379;sentinel://host2:26379;...): the master the
    # sentinels watch, and the sentinels' own password where they require one (the master's
    # password goes in the first sentinel:// part, as sentinel://:PASSWORD@host:26379/0).
    REDIS_SENTINEL_MASTER: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    REDIS_SENTINEL_PASSWORD: str | None = None
    # The model a request without `model` asks for: its workers consume the `render` queue (and their
    # model's own), every other model's workers `render.<model>` (worker_config/routing.py). Unset:
    # a single-model farm, every worker consumes `render` (and its model's own queue).
    DEFAULT_MODEL: str | None = Field(None, min_length=1, max_length=200)
    # The `image` of an image-conditioned render (tasks/images.py): its size in bytes (the decoded
    # data URL, or the object), and its width x height, checked before the pixels are decoded (a
    # few KB of PNG can hold gigapixels of one colour). Workers check it; producers (the HTTP
    # gateway, `renderfarm upload-image`) check the same limits first.
    MAX_IMAGE_BYTES: int = Field(10 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    MAX_IMAGE_PIXELS: int = Field(6000 * 6000, ge=16 * 16, le=100_000_000)
    # Request limits: a prompt's characters, and width x height x frames. Workers check them; the
    # HTTP gateway checks the same first, so that a request it accepts is not refused by a worker.
    MAX_PROMPT_CHARS: int = Field(2000, ge=1, le=100_000)
    MAX_PIXEL_FRAMES: int = Field(1280 * 720 * 129, ge=16 * 16)

    @field_validator("REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_PASSWORD", "DEFAULT_MODEL", mode="before")
    @classmethod
    def _blank_broker_setting_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("REDIS_URL")
    @classmethod
    def _redis_url_shape(cls, value: str) -> str:
        check_url(value)
        return value.strip()

    @field_validator("DEFAULT_MODEL")
    @classmethod
    def _model_names_a_queue(cls, value: str | None) -> str | None:
        if value is not None:
            queue_for(value, None)  # ValueError: no letter or digit to name its queue by
        return value

    @model_validator(mode="after")
    def _sentinel_has_a_master(self: _S) -> _S:
        if is_sentinel(self.REDIS_URL) and not self.REDIS_SENTINEL_MASTER:
            raise ValueError("REDIS_URL names Redis Sentinels: set REDIS_SENTINEL_MASTER to the master they watch")
        return self


class Settings(BrokerSettings):
    """What a worker reads: everything."""

    # Object storage (MinIO or any S3 endpoint). Endpoints are host:port or a URL.
    MINIO_ENDPOINT: str = "127.0.0.1:9000"
    MINIO_PUBLIC_ENDPOINT: str | None = None
    MINIO_ACCESS_KEY: str | None = None
    MINIO_SECRET_KEY: str | None = None
    MINIO_BUCKET: str = Field("renders", min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$")
    MINIO_SECURE: bool = False
    MINIO_REGION: str = "us-east-1"
    # CA certificates (PEM) to trust for MINIO_ENDPOINT over HTTPS, for a private CA; unset: the
    # public CAs (certifi).
    MINIO_CA_BUNDLE: FilePath | None = None
    PRESIGN_EXPIRES_S: int = Field(24 * 3600, ge=60, le=7 * 24 * 3600)
    STORAGE_TIMEOUT_S: float = Field(10.0, gt=0, le=600)
    STORAGE_MAX_RETRIES: int = Field(6, ge=0, le=50)

    # Model and engine.
    MODEL_ID: str = Field("tiny-wan", min_length=1)
    MODEL_CACHE_DIR: Path = _DEFAULT_CACHE / "models"
    # The Hub revision of MODEL_ID's weights (a commit hash pins them; unset follows "main").
    MODEL_REVISION: str | None = Field(None, min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._/-]+$")
    ENGINE: Literal["fastvideo", "diffusers"] | None = None
    DISTRIBUTED_EXECUTOR_BACKEND: Literal["mp", "ray"] = "mp"
    NUM_GPUS: int = Field(1, ge=1, le=64)
    # Where renders run: auto = CUDA, the CPU only for tiny-wan (a real model without usable CUDA
    # stops the worker at start with the diagnosis); cuda = CUDA or stop; cpu = the CPU, on purpose.
    DEVICE: Literal["auto", "cuda", "cpu"] = "auto"
    CUDA_VISIBLE_DEVICES: str | None = None
    PYTORCH_CUDA_ALLOC_CONF: str | None = None

    # --- FastVideo engine (ENGINE=fastvideo) and the start-up self-check ------------------------
    # Passed to VideoGenerator.from_pretrained under FastVideo's own names (in brackets) by
    # tasks/engines/fastvideo_engine.py. Without an accelerator, tasks/engines/fastvideo_cpu.py
    # overrides the offload, pinning and precision options (a CPU has nothing to offload to).
    FASTVIDEO_DIT_CPU_OFFLOAD: bool = True  # [dit_cpu_offload]
    FASTVIDEO_TEXT_ENCODER_CPU_OFFLOAD: bool = True  # [text_encoder_cpu_offload]
    FASTVIDEO_VAE_CPU_OFFLOAD: bool = True  # [vae_cpu_offload]
    FASTVIDEO_PIN_CPU_MEMORY: bool = True  # [pin_cpu_memory]
    FASTVIDEO_USE_FSDP_INFERENCE: bool = False  # [use_fsdp_inference]
    # [dit_precision]; "auto" keeps the model's own default (fp32 everywhere on CPU).
    FASTVIDEO_PRECISION: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # [text_encoder_precisions]: Wan's umt5-xxl text encoder (about 5.7 B parameters) is 22.7 GB in
    # FastVideo's default fp32 and 11.4 GB in bf16, in pinned host memory while it is offloaded:
    # bf16 fits a 32 GB node (docs/deploy.md#host-memory); "auto" keeps FastVideo's default.
    FASTVIDEO_TEXT_ENCODER_PRECISION: Literal["auto", "bf16", "fp16", "fp32"] = "bf16"
    # FastVideo's attention backend, read by FastVideo itself from this variable in its workers
    # (FastWan's sparse models: VIDEO_SPARSE_ATTN); unset = FastVideo chooses. The names of its
    # AttentionBackendEnum (0.2.1); tests/test_fastvideo_contract.py checks them against the package.
    FASTVIDEO_ATTENTION_BACKEND: (
        Literal[
            "FLASH_ATTN", "TORCH_SDPA", "SAGE_ATTN", "SAGE_ATTN_THREE", "VIDEO_SPARSE_ATTN", "VIDEO_SPARSE_ATTN_H3",
            "BSA_ATTN", "VMOBA_ATTN", "SLA_ATTN", "SAGE_SLA_ATTN", "NABLA_ATTN",
        ]
        | None
    ) = None  # fmt: skip
    # [VSA_sparsity]: the share of attention tiles video sparse attention skips (FastWan: 0.8-0.9).
    FASTVIDEO_VSA_SPARSITY: float | None = Field(None, ge=0.0, lt=1.0)
    # The address FastVideo's Ray executor asks Ray to place its workers at (FastVideo reads it from
    # this variable: its get_ip() otherwise guesses from the default route, and answers 0.0.0.0 on a
    # host without one). Unset: the engine sets it to the address of the pool child's own Ray node.
    FASTVIDEO_HOST_IP: str | None = None
    # How long a pool child waits for FastVideo's Ray executor to get its placement group at start
    # (FastVideo's own wait is 1800 s, silent); then the worker falls back or exits with the diagnosis.
    # Well under the start-up probe's window (docs/deploy.md#probes).
    FASTVIDEO_RAY_START_TIMEOUT_S: float = Field(120.0, gt=0, le=1800)
    # What a pool child tries, in order, when the self-check finds FastVideo's mp executor cannot
    # run here (multiprocessing or /dev/shm unusable), or FastVideo's Ray executor did not start:
    # "ray" (FastVideo with the Ray executor), "diffusers" (the diffusers engine). Comma-separated;
    # "none" or "" = exit with the diagnosis.
    ENGINE_FALLBACKS: str = "ray,diffusers"
    # Free space /dev/shm must have for FastVideo's mp executor (Docker's default is 64 MB).
    MIN_SHM_MB: int = Field(1024, ge=0)
    # Print the self-check banner in every pool child before it takes work (python -m tasks.worker.selfcheck).
    SELFCHECK: bool = True

    # Worker behaviour.
    # queue: one task at a time, acknowledged after upload (interruptible nodes: Salad).
    # buffer: one task prefetched, uploads in the background while the next renders (stable hosts: Vast.ai).
    WORKER_MODE: Literal["queue", "buffer"] = "queue"
    # Pool process recycling (Celery's worker_max_tasks_per_child / worker_max_memory_per_child):
    # a fresh process, which loads the model again, after this many tasks or once its resident
    # memory passes this many MiB after a task. 0 turns either off. See docs/benchmarks.md.
    WORKER_MAX_TASKS_PER_CHILD: int = Field(500, ge=0)
    WORKER_MAX_MEMORY_PER_CHILD_MB: int = Field(0, ge=0)
    # glibc keeps up to this much freed memory for the next render instead of handing it back to
    # the kernel after every tensor (tasks/worker/allocator.py); 0 leaves glibc's defaults.
    KEEP_FREED_MEMORY_MB: int = Field(1024, ge=0, le=2047)
    SPOOL_DIR: Path = _DEFAULT_CACHE / "spool"
    # Spooled videos older than this are removed when a pool process starts and when an upload
    # gives up (their task failed, or its retry ran on another host); must outlast the retries.
    SPOOL_MAX_AGE_S: int = Field(24 * 3600, ge=600)
    # Where the worker leaves its heartbeat and model-loaded markers for the liveness and start-up
    # probes (tasks/worker/vitals.py), read on the same host without Redis.
    HEALTH_DIR: Path = Path(tempfile.gettempdir()) / "renderfarm-health"
    RENDER_SOFT_TIME_LIMIT_S: int = Field(1800, ge=1)
    RENDER_TIME_LIMIT_S: int = Field(1900, ge=2)
    # Redis gives an unacknowledged task to another worker once its lease is this old. A running
    # task's lease is renewed every LEASE_RENEW_S by its worker's main process (tasks/worker/lease.py),
    # so a slow healthy render is never started twice, and a dead node's task moves on in minutes.
    VISIBILITY_TIMEOUT_S: int = Field(300, ge=3)
    LEASE_RENEW_S: float = Field(30.0, gt=0)
    WORKER_PROC_ALIVE_TIMEOUT_S: float = Field(900.0, gt=4)
    RESULT_EXPIRES_S: int = Field(7 * 24 * 3600, ge=60)
    # Videos are deleted by the bucket's lifecycle rule this many days after they were stored
    # (0 = kept for ever); results never outlive them (result_expires_s).
    RENDER_RETENTION_DAYS: int = Field(0, ge=0, le=36500)
    MAX_DELIVERIES: int = Field(3, ge=1, le=20)
    # While a render denoises, its state is saved to the bucket this often (tasks/pipeline/checkpoints.py),
    # in the background; a delivery of the same render continues from it, and a worker shutting down
    # (SIGTERM) saves it where it stops. At most this much GPU time (plus one save) is lost when a
    # node dies. 0 turns checkpoints off. See docs/reliability.md#checkpoints for the default.
    CHECKPOINT_EVERY_S: float = Field(30.0, ge=0, le=3600)

    # --- Operator and producer experience (issue 6): metrics, logs, webhooks ----------------------
    # Prometheus metrics served by the worker's main process on this port (0 = off); each worker
    # on a host needs its own port (`renderfarm worker` gives the N-th GPU worker METRICS_PORT+N).
    METRICS_PORT: int = Field(0, ge=0, le=65535)
    # Loopback by default: metrics name models, queues and failure reasons, and on a shared host no
    # other user should read them. Containers set 0.0.0.0 (the image does): their network is their own.
    METRICS_ADDR: str = "127.0.0.1"
    # Worker log lines: "text" (Celery's layout plus the task id) or "json" (one object a line).
    LOG_FORMAT: Literal["text", "json"] = "text"
    # Webhooks (the request's webhook_url): signing key (HMAC-SHA256), the hosts a URL may name
    # (comma-separated: host, *.domain, IP or CIDR; empty = webhooks refused), retries with backoff.
    WEBHOOK_SECRET: str | None = None
    WEBHOOK_ALLOWED_HOSTS: str = ""
    WEBHOOK_TIMEOUT_S: float = Field(10.0, gt=0, le=120)
    WEBHOOK_MAX_RETRIES: int = Field(8, ge=0, le=50)
    WEBHOOK_RETRY_BACKOFF_S: int = Field(2, ge=1, le=600)
    WEBHOOK_RETRY_BACKOFF_MAX_S: int = Field(600, ge=1, le=86400)
    # The queue deliveries go to: the render queue by default, where they jump ahead of queued
    # renders (top priority); a separate queue needs its own light worker (docs/monitoring.md).
    WEBHOOK_QUEUE: str = Field("render", min_length=1)

    @field_validator("ENGINE", mode="before")
    @classmethod
    def _blank_engine_is_auto(cls, value: object) -> object:
        return None if value in ("", "auto") else value

    @field_validator("FASTVIDEO_ATTENTION_BACKEND", "FASTVIDEO_VSA_SPARSITY", "MINIO_CA_BUNDLE", "MODEL_REVISION",
                     "FASTVIDEO_HOST_IP", mode="before")  # fmt: skip
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("MODEL_ID")
    @classmethod
    def _model_id_names_a_queue(cls, value: str) -> str:
        queue_for(value, None)  # ValueError: no letter or digit to name its queue by
        return value

    @field_validator("FASTVIDEO_HOST_IP")
    @classmethod
    def _host_ip_is_an_address(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError("use an IPv4 or IPv6 address (Ray's node address), or leave it unset") from None
        return value

    @field_validator("ENGINE_FALLBACKS", mode="before")
    @classmethod
    def _fallbacks_known(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        items = [item.strip() for item in value.split(",") if item.strip() and item.strip() != "none"]
        unknown = [item for item in items if item not in ("ray", "diffusers")]
        if unknown or len(set(items)) != len(items):
            raise ValueError(
                f"use a comma-separated list of 'ray' and 'diffusers' (each at most once), or 'none'; got {value!r}"
            )
        return ",".join(items)

    @field_validator("MINIO_ENDPOINT", "MINIO_PUBLIC_ENDPOINT")
    @classmethod
    def _endpoint_shape(cls, value: str | None) -> str | None:
        if value is not None:
            endpoint_parts(value, secure=False)
        return value

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> Settings:
        if self.RENDER_TIME_LIMIT_S <= self.RENDER_SOFT_TIME_LIMIT_S:
            raise ValueError("RENDER_TIME_LIMIT_S must be greater than RENDER_SOFT_TIME_LIMIT_S")
        if self.VISIBILITY_TIMEOUT_S < 3 * self.LEASE_RENEW_S:
            raise ValueError(
                "VISIBILITY_TIMEOUT_S must be at least 3 x LEASE_RENEW_S, or a healthy render's lease could "
                "lapse between two renewals and the task be delivered to a second worker"
            )
        return self

    # Derived values: computed, never stored twice.
    @property
    def result_expires_s(self) -> int:
        """How long results stay in Redis: RESULT_EXPIRES_S, never longer than the videos they point at."""
        if self.RENDER_RETENTION_DAYS:
            return min(self.RESULT_EXPIRES_S, self.RENDER_RETENTION_DAYS * 24 * 3600)
        return self.RESULT_EXPIRES_S

    @property
    def restore_interval_s(self) -> int:
        """How often each worker sweeps Redis for lapsed leases (at most every 10 s)."""
        return max(1, min(10, self.VISIBILITY_TIMEOUT_S // 3))

    @property
    def engine_fallbacks(self) -> tuple[str, ...]:
        """ENGINE_FALLBACKS as a tuple, in order; empty when the worker should exit instead."""
        return tuple(item for item in self.ENGINE_FALLBACKS.split(",") if item)

    @property
    def public_endpoint(self) -> str:
        return self.MINIO_PUBLIC_ENDPOINT or self.MINIO_ENDPOINT


def endpoint_parts(endpoint: str, secure: bool) -> tuple[str, bool]:
    """Split ``host:port`` or ``http(s)://host:port`` into (host:port, secure)."""
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"{endpoint!r} is not an S3 endpoint: use host:port or http(s)://host:port, no path")
        return parts.netloc, parts.scheme == "https"
    if not endpoint or "/" in endpoint:
        raise ValueError(f"{endpoint!r} is not an S3 endpoint: use host:port or http(s)://host:port, no path")
    return endpoint, secure


def describe_errors(exc: ValidationError) -> str:
    """One line per invalid setting: the variable, the value given and what is allowed."""
    lines = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        given = err.get("input")
        if name in _SECRETS:
            given = redacted(given) if name == "REDIS_URL" and isinstance(given, str) else "(hidden)"
        shown = f" (got {given!r})" if name != "settings" and not isinstance(given, dict) else ""
        lines.append(f"{name}{shown}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The worker's settings, read from the environment once."""
    return _read(Settings)


@functools.lru_cache(maxsize=1)
def get_broker_settings() -> BrokerSettings:
    """A producer's settings (the broker only), read from the environment once."""
    return _read(BrokerSettings)


def _read(kind: type[_S]) -> _S:
    try:
        return kind()
    except ValidationError as exc:
        raise SettingsError(f"invalid settings: {describe_errors(exc)}") from None
