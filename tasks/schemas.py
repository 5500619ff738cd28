"""Wire types: the render request a producer sends and the result it gets back.

Both are small pydantic models. The request is validated before any model work: unknown fields
are rejected, every field is typed and bounded, and the messages name the field and what is
allowed. Fields left out are filled from the served model's profile (``tasks.profiles``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.errors import InvalidRequest
from tasks.webhook import WebhookPolicy

__all__ = [
    "RenderRequest", "RenderResult", "Limits", "Problem", "parse_request", "check_fields", "invalid", "MAX_SIDE",
    "MAX_FRAMES",
]  # fmt: skip

MAX_SIDE = 1920
MAX_FRAMES = 257
_ALLOWED_CONTROL = {"\n", "\t"}
# Format characters (Unicode category Cf) are invisible: zero-width spaces, bidirectional overrides
# and isolates (U+202A-U+202E, U+2066-U+2069) that make text read differently from what it holds,
# the byte-order mark, tag characters. Two are kept: the zero-width joiner and non-joiner, which
# emoji sequences and several scripts (Persian, Hindi, ...) need to be written correctly.
_ALLOWED_FORMAT = {"\u200c", "\u200d"}


def _check_text(value: str, field: str) -> str:
    bad = [ch for ch in value if unicodedata.category(ch) in ("Cc", "Cs", "Co") and ch not in _ALLOWED_CONTROL]
    if bad:
        raise ValueError(
            f"{field} contains control character {bad[0]!r}; only printable text, newlines and tabs are allowed"
        )
    hidden = [ch for ch in value if unicodedata.category(ch) == "Cf" and ch not in _ALLOWED_FORMAT]
    if hidden:
        name = unicodedata.name(hidden[0], "a format character")
        raise ValueError(
            f"{field} contains the invisible or bidirectional formatting character U+{ord(hidden[0]):04X} ({name}); "
            "only printable text, newlines and tabs are allowed (zero-width joiners excepted)"
        )
    return value


class RenderRequest(BaseModel):
    """What ``tasks.render`` accepts, as keyword arguments."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str = Field(min_length=1, max_length=100_000)
    negative_prompt: str | None = Field(None, max_length=100_000)
    # Bounds checked below, all at once: a value that breaks two rules is told both.
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    fps: int | None = Field(None, ge=1, le=120)
    model: str | None = Field(None, min_length=1, max_length=200)
    # Image-conditioned renders (models that take an image): a data:image/png|jpeg|webp;base64 URL or
    # s3://<the farm's bucket>/<key> (tasks.images). Its bytes are checked by the worker (s1_validate),
    # and the video's key holds their hash, not this text.
    image: str | None = Field(None, min_length=1, max_length=96 * 1024 * 1024)
    force: bool = False
    # Not part of the video (nor of its object key): where to POST the result when the render ends.
    # Its syntax is checked here; the host allow-list and addresses in ``keys.resolve`` (``Limits``).
    webhook_url: str | None = Field(None, min_length=1, max_length=2048)

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        # JSON has one number type: 5 and 5.0 mean the same scale. Booleans are not numbers.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank")
        return _check_text(value, "prompt")

    @field_validator("negative_prompt")
    @classmethod
    def _negative_text(cls, value: str | None) -> str | None:
        return None if value is None else _check_text(value, "negative_prompt")

    @field_validator("image")
    @classmethod
    def _image_reference(cls, value: str | None) -> str | None:
        if value is not None:
            from tasks.images import parse_ref

            parse_ref(value)
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_syntax(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("use an absolute http:// or https:// URL")
        return _check_text(value, "webhook_url")

    @field_validator("height", "width")
    @classmethod
    def _side(cls, value: int | None) -> int | None:
        if value is not None:
            _report(_broken(value, 16, MAX_SIDE, multiple_of=16))
        return value

    @field_validator("num_frames")
    @classmethod
    def _wan_frame_count(cls, value: int | None) -> int | None:
        if value is not None:
            problems = _broken(value, 1, MAX_FRAMES)
            if value % 4 != 1:
                problems.append(f"Wan needs a frame count of the form 4k+1 (1, 5, 9, ..., 81, ...); {value} is not")
            _report(problems)
        return value


def _broken(value: int, low: int, high: int, multiple_of: int | None = None) -> list[str]:
    """The bounds ``value`` breaks, in pydantic's words ("Input should be X and Y"); empty when none."""
    rules = [
        (value < low, f"greater than or equal to {low}"),
        (value > high, f"less than or equal to {high}"),
        (multiple_of is not None and value % multiple_of != 0, f"a multiple of {multiple_of}"),
    ]
    broken = [rule for failed, rule in rules if failed]
    return ["Input should be " + " and ".join(broken)] if broken else []


def _report(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


class Limits(BaseModel):
    """Per-deployment limits from settings, checked after the profile fills the defaults."""

    max_prompt_chars: int
    max_pixel_frames: int
    models: tuple[str, ...]
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 6000 * 6000
    # Webhook allow-list and secret (WEBHOOK_ALLOWED_HOSTS, WEBHOOK_SECRET): every worker passes its
    # own deployment's (tasks.pipeline.resources); without one, webhooks are refused.
    webhooks: WebhookPolicy = Field(default_factory=WebhookPolicy)


class RenderResult(BaseModel):
    """What ``tasks.render`` returns (as a JSON object) once the MP4 is stored."""

    bucket: str
    key: str
    url: str
    url_expires_s: int
    size_bytes: int
    sha256: str
    width: int
    height: int
    num_frames: int
    fps: int
    seed: int
    model: str
    engine: str
    cached: bool
    worker: str
    worker_pid: int
    timings: dict[str, float]
    # Peak memory of this render in the process that runs the model (FastVideo: its worker): CUDA
    # memory allocated by torch where a GPU renders, else that process's resident set (VmHWM, reset
    # before the render). None when served from storage.
    peak_memory_mb: float | None = None
    memory_source: str | None = None
    # The video's poster (its middle frame, JPEG) beside it in the bucket, and a presigned URL with
    # the same expiry; None for a video stored before posters existed.
    poster_key: str | None = None
    poster_url: str | None = None
    # Nine frames spread over the video in a 3x3 grid (JPEG, tiles at most 256 wide) beside it; None
    # for a video stored without one.
    spritesheet_key: str | None = None
    spritesheet_url: str | None = None
    # An image-conditioned render's image: its SHA-256 (part of ``key``) and where it is stored
    # (``inputs/<sha256>.<ext>`` in the same bucket); None for a text-to-video render.
    image_sha256: str | None = None
    image_key: str | None = None


class Problem(NamedTuple):
    """One thing wrong with a request: the field it is about and what is wrong, in words."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def parse_request(kwargs: dict[str, Any]) -> RenderRequest:
    """Validate raw task kwargs; raise ``InvalidRequest`` naming every bad field."""
    request, _, problems = check_fields(kwargs)
    if request is None:
        raise invalid(problems)
    return request


def check_fields(kwargs: dict[str, Any]) -> tuple[RenderRequest | None, dict[str, Any], list[Problem]]:
    """(the request or None, the fields that passed the schema, a ``Problem`` for each that did not).
    The fields that passed (None values left out) are what later checks can still judge."""
    try:
        request = RenderRequest.model_validate(kwargs)
    except ValidationError as exc:
        problems = _problems(exc)
        failed = {problem.field for problem in problems}
        passed = {k: v for k, v in kwargs.items() if k in RenderRequest.model_fields and k not in failed}
        return None, {k: v for k, v in passed.items() if v is not None}, problems
    return request, request.model_dump(exclude_none=True), []


def invalid(problems: Iterable[Problem]) -> InvalidRequest:
    """One ``InvalidRequest`` naming every problem, in the order of the request's fields (unknown fields,
    then the checks on several fields, such as ``size``, last)."""
    order = {name: i for i, name in enumerate(RenderRequest.model_fields)}
    ranked = sorted(problems, key=lambda p: order.get(p.field, len(order)))
    return InvalidRequest(f"invalid render request: {'; '.join(map(str, ranked))}")


def _problems(exc: ValidationError) -> list[Problem]:
    found = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "request"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(RenderRequest.model_fields)
            msg = f"unknown field; allowed fields: {allowed}"
        elif err["type"] == "missing":
            msg = "required"
        found.append(Problem(field, msg))
    return found
