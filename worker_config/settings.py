"""Settings: the one place that reads the environment.

Every knob of the render farm is a field here, named exactly as its environment variable
(see docs/settings.md). ``get_settings()`` builds the object once per process; everything else
receives it or calls ``get_settings()``. Invalid values fail with a message that names the
variable and what is allowed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "SettingsError", "get_settings", "endpoint_parts", "describe_errors"]

_DEFAULT_CACHE = Path.home() / ".cache" / "renderfarm"


class SettingsError(ValueError):
    """The environment holds an invalid setting; the message names it and what is allowed."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True)

    # Broker and result backend.
    REDIS_URL: str = "redis://127.0.0.1:6379/0"

    # Object storage (MinIO or any S3 endpoint). Endpoints are host:port or a URL.
    MINIO_ENDPOINT: str = "127.0.0.1:9000"
    MINIO_PUBLIC_ENDPOINT: str | None = None
    MINIO_ACCESS_KEY: str | None = None
    MINIO_SECRET_KEY: str | None = None
    MINIO_BUCKET: str = Field("renders", min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$")
    MINIO_SECURE: bool = False
    MINIO_REGION: str = "us-east-1"
    PRESIGN_EXPIRES_S: int = Field(24 * 3600, ge=60, le=7 * 24 * 3600)
    STORAGE_TIMEOUT_S: float = Field(10.0, gt=0, le=600)
    STORAGE_MAX_RETRIES: int = Field(6, ge=0, le=50)

    # Model and engine.
    MODEL_ID: str = Field("tiny-wan", min_length=1)
    MODEL_CACHE_DIR: Path = _DEFAULT_CACHE / "models"
    ENGINE: Literal["fastvideo", "diffusers"] | None = None
    DISTRIBUTED_EXECUTOR_BACKEND: Literal["mp", "ray"] = "mp"
    NUM_GPUS: int = Field(1, ge=1, le=64)
    CUDA_VISIBLE_DEVICES: str | None = None
    PYTORCH_CUDA_ALLOC_CONF: str | None = None

    # Worker behaviour.
    WORKER_MODE: Literal["queue", "buffer"] = "queue"
    SPOOL_DIR: Path = _DEFAULT_CACHE / "spool"
    RENDER_SOFT_TIME_LIMIT_S: int = Field(1800, ge=1)
    RENDER_TIME_LIMIT_S: int = Field(1900, ge=2)
    VISIBILITY_TIMEOUT_S: int | None = Field(None, ge=60)
    WORKER_PROC_ALIVE_TIMEOUT_S: float = Field(900.0, gt=4)
    RESULT_EXPIRES_S: int = Field(7 * 24 * 3600, ge=60)
    MAX_DELIVERIES: int = Field(3, ge=1, le=20)

    # Request limits.
    MAX_PROMPT_CHARS: int = Field(2000, ge=1, le=100_000)
    MAX_PIXEL_FRAMES: int = Field(1280 * 720 * 129, ge=16 * 16)

    @field_validator("ENGINE", mode="before")
    @classmethod
    def _blank_engine_is_auto(cls, value: object) -> object:
        return None if value in ("", "auto") else value

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
        if self.VISIBILITY_TIMEOUT_S is not None and self.VISIBILITY_TIMEOUT_S <= self.RENDER_TIME_LIMIT_S:
            raise ValueError(
                "VISIBILITY_TIMEOUT_S must be greater than RENDER_TIME_LIMIT_S, or a healthy render "
                "would be delivered to a second worker while it still runs"
            )
        return self

    # Derived values: computed, never stored twice.
    @property
    def visibility_timeout_s(self) -> int:
        """Redis redelivers an unacknowledged task after this long; always above the hard limit."""
        return self.VISIBILITY_TIMEOUT_S or self.RENDER_TIME_LIMIT_S + 300

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
        shown = f" (got {given!r})" if name != "settings" and not isinstance(given, dict) else ""
        lines.append(f"{name}{shown}: {err['msg']}")
    return "; ".join(lines)


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(f"invalid settings: {describe_errors(exc)}") from None
