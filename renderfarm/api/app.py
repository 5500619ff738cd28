"""The FastAPI application: OpenAI's videos endpoints on this farm's queue.

Errors are OpenAI's error objects (``errors``) with their status codes: 400 naming every bad
parameter, 401 without a valid key, 404 for a video that does not exist or is not the key's (and
for any other path: no redirect is ever built from the request, a trailing slash included), 413
for a body over ``API_MAX_BODY_BYTES`` (refused from its ``Content-Length`` before reading, or
once a chunked body passes the limit), 429 when a key is over its rate or its concurrency quota
(``quotas``), 503 when Redis is unavailable, both with Retry-After. ``guard`` gives every request
its id, log line and body deadline, and turns what escapes the routes into answers.

Nothing here blocks the event loop: every Redis call (records, quotas, the queue, task states)
runs in a worker thread and gives up after ``API_REDIS_TIMEOUT_S``.
``input_reference``: a multipart file, or a data URL in JSON, for models that take an image.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from renderfarm.api.errors import UNAVAILABLE, ApiError, quoted, unavailable
from renderfarm.api.guard import RequestGuard
from renderfarm.api.keys import KeyRing
from renderfarm.api.quotas import Admission, QuotaExceeded, Quotas
from renderfarm.api.records import Records
from renderfarm.api.settings import ApiSettings
from renderfarm.api.videos import (
    BadParameter,
    cancellation_of,
    reference_image,
    render_kwargs,
    shown_size_and_seconds,
    video_object,
)
from tasks.schemas import Limits

__all__ = ["ApiError", "create_app"]

log = logging.getLogger("renderfarm.api")
POLL_AFTER_MS = 500  # how soon the SDK's poll helpers ask again (`openai-poll-after-ms`)
# content's variants: the render result's fields of each (`key`/`url`, `poster_key`/`poster_url`, ...).
_VARIANTS = {"video": "", "thumbnail": "poster_", "spritesheet": "spritesheet_"}


# The create body as the served OpenAPI schema states it (parsed by hand: JSON or multipart).
def _create_fields(reference: dict[str, str]) -> dict[str, Any]:
    fields: dict[str, Any] = {name: {"type": "string"} for name in ("prompt", "model", "size", "seconds")}
    return {"type": "object", "required": ["prompt"], "properties": {**fields, "input_reference": reference}}


_CREATE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _create_fields({"type": "string", "description": "a data:image/... URL"})},
        "multipart/form-data": {"schema": _create_fields({"type": "string", "format": "binary"})},
    },
}


def create_app(settings: ApiSettings) -> FastAPI:
    from tasks import app as celery_app
    from tasks import render
    from tasks.cancel import cancel
    from worker_config.redis_link import redis_client

    _fail_fast(celery_app, settings.API_REDIS_TIMEOUT_S)
    keys = KeyRing(settings.API_KEYS_FILE)
    signer = _signer()
    client = redis_client(settings, timeout_s=settings.API_REDIS_TIMEOUT_S,
                          connect_timeout_s=min(5.0, settings.API_REDIS_TIMEOUT_S))  # fmt: skip
    records = Records(client, settings.API_VIDEO_TTL_S)
    limits = Limits(max_prompt_chars=settings.MAX_PROMPT_CHARS, max_pixel_frames=settings.MAX_PIXEL_FRAMES,
                    models=settings.models, max_image_bytes=settings.MAX_IMAGE_BYTES,
                    max_image_pixels=settings.MAX_IMAGE_PIXELS)  # fmt: skip

    def states(ids: list[str]) -> list[str]:
        return [celery_app.AsyncResult(i).state for i in ids]

    quotas = Quotas(client, settings.API_RATE_LIMIT_PER_MIN, settings.API_MAX_ACTIVE, states)
    # No redirect is ever made from the request (Starlette's trailing-slash one uses the Host header).
    api = FastAPI(title="renderfarm videos API (OpenAI-compatible)", version="1", redirect_slashes=False)
    api.add_middleware(RequestGuard, body_timeout_s=settings.API_BODY_TIMEOUT_S)

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), code=None).response()

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            param = str(err["loc"][-1]) if err.get("loc") else "request"
            problems.append((param, f"{param}: {err['msg']}"))
        return ApiError.bad_parameters(problems).response()

    def owner_of(request: Request) -> str:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        owner = keys.owner(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if owner is None:
            raise ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                           code="invalid_api_key", kind="authentication_error")  # fmt: skip
        return owner

    async def body_of(request: Request) -> bytes:
        """The body, read within the guard's deadline; 413 (and the connection closed) past the limit."""
        limit = settings.API_MAX_BODY_BYTES
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            raise ApiError(413, f"Request body of {quoted(declared)} bytes is over the limit of {limit} bytes",
                           code="request_too_large", headers={"connection": "close"})  # fmt: skip
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"Request body is over the limit of {limit} bytes", code="request_too_large",
                               headers={"connection": "close"})  # fmt: skip
        return bytes(body)

    async def params_of(request: Request) -> tuple[dict[str, Any], bytes | str | None]:
        """The form's parameters (JSON values as they came), and ``input_reference``: a file's bytes, a
        JSON string, or None."""
        body = await body_of(request)
        kind = request.headers.get("content-type", "")
        if kind.startswith("application/json"):
            try:
                data = json.loads(body or b"{}")
            except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
                raise ApiError(400, "The body is not valid JSON", code="invalid_json") from None
            if not isinstance(data, dict):
                raise ApiError(400, "The body must be a JSON object", code="invalid_json")
            reference = data.pop("input_reference", None)
            if reference is not None and not isinstance(reference, str):
                raise ApiError(400, "input_reference: in JSON, a data:image/png|jpeg|webp;base64,... URL; or send "
                               "the file as multipart/form-data", param="input_reference")  # fmt: skip
            return {k: v for k, v in data.items() if v is not None}, reference
        if kind.startswith("multipart/form-data") or kind.startswith("application/x-www-form-urlencoded"):

            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(request.scope, receive=replay).form()
            file = form.get("input_reference")
            reference = file if isinstance(file, str) or file is None else await file.read()
            params = {k: (v if isinstance(v, str) else b"") for k, v in form.items() if k != "input_reference"}
            await form.close()
            return params, reference
        raise ApiError(400, "Send the parameters as JSON or multipart/form-data")

    def current(record: dict[str, Any]) -> dict[str, Any]:
        result = celery_app.AsyncResult(record["id"])
        state, info = result.state, result.info
        if state == "SUCCESS" and record.get("completed_at") is None:
            record = records.completed(record, int(time.time()))
        return video_object(record, state, info)

    def found(video_id: str, owner: str) -> dict[str, Any]:
        record = records.get(video_id, owner)
        if record is None:
            raise ApiError(404, f"No video found with id {quoted(video_id)}", param="video_id", code="not_found")
        return record

    def queue(record: dict[str, Any], kwargs: dict[str, Any]) -> None:
        records.add(record)
        render.apply_async(kwargs=kwargs, task_id=record["id"])

    def take_back(record: dict[str, Any], admission: Admission) -> None:
        """What a create that failed wrote (its record, its quota counts), as far as Redis lets."""
        try:
            records.remove(record)
            quotas.refund(admission)
        except UNAVAILABLE as exc:
            log.warning("could not take back %s after its create failed: %s", record["id"], exc)

    @api.post("/v1/videos", openapi_extra={"requestBody": _CREATE_BODY})
    async def create_video(request: Request) -> JSONResponse:
        owner = owner_of(request)
        params, reference = await params_of(request)
        kwargs, problems = render_kwargs(params, limits)
        if reference is not None and "model" in kwargs:
            try:
                kwargs["image"] = await run_in_threadpool(
                    reference_image, reference, kwargs["model"], settings.MAX_IMAGE_BYTES, settings.MAX_IMAGE_PIXELS
                )
            except BadParameter as exc:
                problems.append((exc.param, str(exc)))
        if problems:
            raise ApiError.bad_parameters(problems)
        size, seconds = shown_size_and_seconds(kwargs, params)
        now = int(time.time())
        video_id = f"video_{uuid.uuid4().hex}"
        try:
            admission = await run_in_threadpool(quotas.admit, owner, video_id)
        except QuotaExceeded as exc:
            raise ApiError(429, str(exc), code=exc.code, kind="rate_limit_error",
                           headers={"retry-after": str(exc.retry_after_s)}) from None  # fmt: skip
        record = {
            "id": video_id, "owner": owner, "model": kwargs["model"], "prompt": kwargs["prompt"],
            "size": size, "seconds": seconds,
            "created_at": now, "expires_at": now + settings.API_VIDEO_TTL_S, "completed_at": None,
        }  # fmt: skip
        try:
            await run_in_threadpool(queue, record, kwargs)
        except UNAVAILABLE as exc:  # nothing was queued: answer now, take back what was written after
            log.warning("%s could not queue %s: %s: %s", request.state.request_id, video_id, type(exc).__name__, exc)
            response = unavailable().response()
            response.background = BackgroundTask(take_back, record, admission)
            return response
        log.info("%s created %s for %s (%s)", request.state.request_id, video_id, owner, kwargs["model"])
        return JSONResponse(video_object(record, "PENDING", None))

    @api.get("/v1/videos/{video_id}")
    def retrieve_video(video_id: str, request: Request) -> JSONResponse:
        video = current(found(video_id, owner_of(request)))
        headers = {"openai-poll-after-ms": str(POLL_AFTER_MS)} if video["status"] in ("queued", "in_progress") else {}
        return JSONResponse(video, headers=headers)

    @api.get("/v1/videos")
    def list_videos(request: Request, after: str | None = None, limit: int = 20, order: str = "desc") -> JSONResponse:
        owner = owner_of(request)
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit: out of range: 1 to 100", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order: {quoted(order)} is not one of asc, desc", param="order")
        page, more = records.page(owner, after, limit, order)
        data = [current(record) for record in page]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": more})  # fmt: skip

    @api.delete("/v1/videos/{video_id}")
    def delete_video(video_id: str, request: Request) -> JSONResponse:
        record = found(video_id, owner_of(request))
        body: dict[str, Any] = {"id": video_id, "object": "video.deleted", "deleted": True}
        if current(record)["status"] in ("queued", "in_progress"):
            # A queued render never starts, a running one stops at its next step or stage boundary:
            # waited for briefly, and what came of it is said (tasks.cancel.Cancellation).
            outcome = cancel(video_id, celery_app, wait_s=settings.API_CANCEL_WAIT_S)
            body["cancellation"] = cancellation_of(outcome)
        records.remove(record)
        quotas.release(record["owner"], video_id)
        log.info("%s deleted %s%s", request.state.request_id, video_id,
                 f" ({body['cancellation']['outcome']})" if "cancellation" in body else "")  # fmt: skip
        return JSONResponse(body)

    @api.get("/v1/videos/{video_id}/content")
    def video_content(video_id: str, request: Request, variant: str = "video") -> Response:
        record = found(video_id, owner_of(request))
        if variant not in _VARIANTS:
            raise ApiError(400, f"variant: {quoted(variant)} is not one of {', '.join(_VARIANTS)}", param="variant")
        result = celery_app.AsyncResult(video_id)
        if result.state != "SUCCESS":
            raise ApiError(400, f"Video '{video_id}' is not completed (status {current(record)['status']})",
                           param="video_id", code="video_not_ready")  # fmt: skip
        done = result.result
        field = _VARIANTS[variant]
        key = done.get(f"{field}key")
        if not key:
            raise ApiError(404, f"Video '{video_id}' has no {variant}", param="variant", code="not_found")
        # A presigned URL on MINIO_PUBLIC_ENDPOINT (the bytes never pass through the gateway): signed
        # now where the gateway has storage credentials, else the render's own (PRESIGN_EXPIRES_S).
        if signer is not None and done.get("bucket") == signer.bucket:
            url = signer.presign(key)
        else:
            url = done[f"{field}url"]
        return RedirectResponse(url, status_code=307)

    return api


def _fail_fast(celery_app: Any, timeout_s: float) -> None:
    """The gateway's Celery client gives up on Redis after ``timeout_s`` (503), where producers wait out an
    outage for minutes (worker_config.celery_config): a request must not hold a thread that long."""
    celery_app.conf.update(
        result_backend_always_retry=False,
        redis_socket_timeout=timeout_s,
        redis_socket_connect_timeout=min(5.0, timeout_s),
        broker_transport_options={**celery_app.conf.broker_transport_options, "socket_timeout": timeout_s,
                                  "socket_connect_timeout": min(5.0, timeout_s)},
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5},
    )  # fmt: skip


def _signer() -> Any:
    """A ``VideoStore`` to presign with, where the gateway has storage credentials (``MINIO_*``); else None."""
    from pydantic import ValidationError

    from tasks.pipeline.storage import VideoStore
    from worker_config.settings import Settings, describe_errors

    try:
        storage = Settings()
    except ValidationError as exc:
        log.warning("no storage settings (%s): content redirects use each render's own URL", describe_errors(exc))
        return None
    if not (storage.MINIO_ACCESS_KEY and storage.MINIO_SECRET_KEY):
        return None
    return VideoStore(storage)
