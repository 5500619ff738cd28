"""The gateway's settings: the broker's (``REDIS_URL``, ``DEFAULT_MODEL``, Sentinel, the request
limits workers apply) and its own: keys, models, quotas, and what protects it from slow or
hostile clients (header and body deadlines, a connection cap, how long to wait on Redis)."""

from __future__ import annotations

import functools

from pydantic import Field, FilePath, ValidationError, field_validator, model_validator

from worker_config.settings import BrokerSettings, SettingsError, describe_errors

__all__ = ["ApiSettings", "get_api_settings"]


class ApiSettings(BrokerSettings):
    # A file of API keys, one per line as `name:sha256-hex-of-the-key` (`renderfarm api-key NAME >> FILE`
    # shows a new key and appends its line). Mount it from a secret; keys themselves are never stored.
    API_KEYS_FILE: FilePath
    # The models clients may ask for, comma-separated; empty: DEFAULT_MODEL only.
    API_MODELS: str = ""
    # Largest request body read, in bytes: a prompt, its options and an `input_reference` image
    # (itself at most MAX_IMAGE_BYTES, 10 MiB), with room for multipart's or base64's overhead.
    API_MAX_BODY_BYTES: int = Field(16 * 1024 * 1024, ge=1024, le=96 * 1024 * 1024)
    # How long a video's record (and so the video, for its owner) is kept: `expires_at`.
    API_VIDEO_TTL_S: int = Field(7 * 24 * 3600, ge=60)
    # Per key: video creations a minute (0 = no limit), and videos queued or rendering at once
    # (0 = no limit). Over either: 429 with Retry-After. Counted in Redis, across every replica.
    API_RATE_LIMIT_PER_MIN: int = Field(60, ge=0)
    API_MAX_ACTIVE: int = Field(20, ge=0)
    # Slow or hostile clients (docs/deploy.md#the-videos-api-facing-the-internet): a request's headers
    # must arrive within API_HEADER_TIMEOUT_S of the connection (or of its first byte, on a reused
    # one), else the connection is closed after a 408; its body within API_BODY_TIMEOUT_S of the
    # headers, else 408 and what was read is dropped. Over API_MAX_CONNECTIONS open connections, a
    # request gets 503 with Retry-After. Redis calls give up after API_REDIS_TIMEOUT_S (503).
    API_HEADER_TIMEOUT_S: float = Field(10.0, gt=0, le=600)
    API_BODY_TIMEOUT_S: float = Field(60.0, gt=0, le=3600)
    API_MAX_CONNECTIONS: int = Field(100, ge=1, le=100_000)
    API_REDIS_TIMEOUT_S: float = Field(5.0, gt=0, le=120)
    # DELETE of a video still queued or rendering waits up to this long for the cancel's outcome
    # (its `cancellation`: stopped at which stage or step, still queued, finished meanwhile...).
    API_CANCEL_WAIT_S: float = Field(5.0, ge=0, le=30)

    @field_validator("API_MODELS")
    @classmethod
    def _models_listed(cls, value: str) -> str:
        return ",".join(item.strip() for item in value.split(",") if item.strip())

    @model_validator(mode="after")
    def _serves_a_model(self) -> ApiSettings:
        # Without a model every create would be refused: refuse to start instead, naming the fix.
        if not self.models:
            raise ValueError(
                "API_MODELS and DEFAULT_MODEL are both unset, so no model could be asked for: set API_MODELS to "
                "the models clients may ask for (comma-separated, e.g. API_MODELS=tiny-wan) or DEFAULT_MODEL to the "
                "farm's default model"
            )
        return self

    @property
    def models(self) -> tuple[str, ...]:
        listed = tuple(self.API_MODELS.split(",")) if self.API_MODELS else ()
        return listed or ((self.DEFAULT_MODEL,) if self.DEFAULT_MODEL else ())


@functools.lru_cache(maxsize=1)
def get_api_settings() -> ApiSettings:
    try:
        return ApiSettings()  # type: ignore[call-arg]  # API_KEYS_FILE comes from the environment
    except ValidationError as exc:
        raise SettingsError(f"invalid settings: {describe_errors(exc)}") from None
