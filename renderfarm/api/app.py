"""The FastAPI application: OpenAI's videos endpoints on this farm's queue.

Errors are OpenAI's error objects (``{"error": {"message", "type", "param", "code"}}``) with
their status codes: 400 naming the parameter, 401 without a valid key, 404 for a video that does
not exist or is not the key's, 413 for a body over ``API_MAX_BODY_BYTES`` (refused from its
``Content-Length`` before reading, or once a chunked body passes the limit). Every response carries
``x-request-id`` (the client's, or a new one), and the gateway's log lines name it; keys are never
logged. 429 when a key is over its rate or its concurrency quota (``quotas``), with Retry-After.
``input_reference``: a multipart file, or a data URL in JSON, for models that take an image.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from renderfarm.api.keys import KeyRing
from renderfarm.api.quotas import QuotaExceeded, Quotas
from renderfarm.api.records import Records
from renderfarm.api.settings import ApiSettings
from renderfarm.api.videos import BadParameter, reference_image, render_kwargs, shown_size_and_seconds, video_object

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


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def create_app(settings: ApiSettings) -> FastAPI:
    from tasks import app as celery_app
    from tasks import render
    from tasks.cancel import cancel
    from worker_config.redis_link import redis_client

    keys = KeyRing(settings.API_KEYS_FILE)
    signer = _signer()
    client = redis_client(settings, timeout_s=10, connect_timeout_s=5)
    records = Records(client, settings.API_VIDEO_TTL_S)

    def states(ids: list[str]) -> list[str]:
        return [celery_app.AsyncResult(i).state for i in ids]

    quotas = Quotas(client, settings.API_RATE_LIMIT_PER_MIN, settings.API_MAX_ACTIVE, states)
    api = FastAPI(title="renderfarm videos API (OpenAI-compatible)", version="1")

    @api.middleware("http")
    async def request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        rid = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        request.state.request_id = rid
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["x-request-id"] = rid
        log.info("%s %s %s %d %.0fms", rid, request.method, request.url.path, response.status_code,
                 1000 * (time.perf_counter() - started))  # fmt: skip
        return response

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), code=None).response()

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        param = str(err["loc"][-1]) if err.get("loc") else None
        return ApiError(400, f"{param}: {err['msg']}", param=param).response()

    def owner_of(request: Request) -> str:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        owner = keys.owner(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if owner is None:
            raise ApiError(401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                           code="invalid_api_key", kind="authentication_error")  # fmt: skip
        return owner

    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.API_MAX_BODY_BYTES:
            raise ApiError(413, f"Request body of {declared} bytes is over the limit of "
                           f"{settings.API_MAX_BODY_BYTES} bytes", code="request_too_large")  # fmt: skip
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.API_MAX_BODY_BYTES:
                raise ApiError(413, f"Request body is over the limit of {settings.API_MAX_BODY_BYTES} bytes",
                               code="request_too_large")  # fmt: skip
        return bytes(body)

    async def params_of(request: Request) -> tuple[dict[str, str], bytes | str | None]:
        """The form's parameters, and ``input_reference``: a file's bytes, a JSON string, or None."""
        body = await body_of(request)
        kind = request.headers.get("content-type", "")
        if kind.startswith("application/json"):
            import json

            try:
                data = json.loads(body or b"{}")
            except ValueError:
                raise ApiError(400, "The body is not valid JSON") from None
            if not isinstance(data, dict):
                raise ApiError(400, "The body must be a JSON object")
            reference = data.pop("input_reference", None)
            if reference is not None and not isinstance(reference, str):
                raise ApiError(400, "input_reference: in JSON, a data:image/png|jpeg|webp;base64,... URL; or send "
                               "the file as multipart/form-data", param="input_reference")  # fmt: skip
            return {k: str(v) for k, v in data.items() if v is not None}, reference
        if kind.startswith("multipart/form-data") or kind.startswith("application/x-www-form-urlencoded"):

            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(request.scope, receive=replay).form()
            file = form.get("input_reference")
            reference = file if isinstance(file, str) or file is None else await file.read()
            return {k: v for k, v in form.items() if isinstance(v, str) and k != "input_reference"}, reference
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
            raise ApiError(404, f"No video found with id '{video_id}'", param="video_id", code="not_found")
        return record

    @api.post("/v1/videos", openapi_extra={"requestBody": _CREATE_BODY})
    async def create_video(request: Request) -> JSONResponse:
        owner = owner_of(request)
        params, reference = await params_of(request)
        try:
            kwargs = render_kwargs(params, settings.models)
            if reference is not None:
                kwargs["image"] = await run_in_threadpool(
                    reference_image, reference, kwargs["model"], settings.MAX_IMAGE_BYTES, settings.MAX_IMAGE_PIXELS
                )
        except BadParameter as exc:
            raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None
        size, seconds = shown_size_and_seconds(kwargs, params)
        now = int(time.time())
        video_id = f"video_{uuid.uuid4().hex}"
        try:
            quotas.admit(owner, video_id)
        except QuotaExceeded as exc:
            response = ApiError(429, str(exc), code=exc.code, kind="rate_limit_error").response()
            response.headers["retry-after"] = str(exc.retry_after_s)
            return response
        record = {
            "id": video_id, "owner": owner, "model": kwargs["model"], "prompt": kwargs["prompt"],
            "size": size, "seconds": seconds,
            "created_at": now, "expires_at": now + settings.API_VIDEO_TTL_S, "completed_at": None,
        }  # fmt: skip
        records.add(record)
        try:
            await run_in_threadpool(render.apply_async, kwargs=kwargs, task_id=video_id)
        except Exception as exc:  # noqa: BLE001 - the broker is unreachable: nothing was queued
            records.remove(record)
            quotas.release(owner, video_id)
            log.warning("%s could not queue %s: %s", request.state.request_id, video_id, exc)
            raise ApiError(503, "The render queue is unreachable; try again", code="queue_unavailable",
                           kind="server_error") from None  # fmt: skip
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
            raise ApiError(400, f"limit: {limit} is out of range: 1 to 100", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order: '{order}' is not one of asc, desc", param="order")
        page, more = records.page(owner, after, limit, order)
        data = [current(record) for record in page]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": more})  # fmt: skip

    @api.delete("/v1/videos/{video_id}")
    def delete_video(video_id: str, request: Request) -> JSONResponse:
        record = found(video_id, owner_of(request))
        if current(record)["status"] in ("queued", "in_progress"):
            cancel(video_id, celery_app)  # a queued render never starts, a running one stops at its next step
        records.remove(record)
        quotas.release(record["owner"], video_id)
        log.info("%s deleted %s", request.state.request_id, video_id)
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    @api.get("/v1/videos/{video_id}/content")
    def video_content(video_id: str, request: Request, variant: str = "video") -> Response:
        record = found(video_id, owner_of(request))
        if variant not in _VARIANTS:
            raise ApiError(400, f"variant: '{variant}' is not one of {', '.join(_VARIANTS)}", param="variant")
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
