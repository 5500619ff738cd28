"""Stage 1, ``validating``: the request, checked before any model work.

The keyword arguments are validated (``tasks.schemas``), the model checked (served here? does it take
the image the request sends?), an image-conditioned render's image read and checked by its content
(``tasks.images``) and stored at its content address, the defaults of the served model filled in
and the deployment's limits checked (``tasks.keys.resolve``), and the object key computed.

Problems are reported all at once, in one ``InvalidRequest`` naming every bad field: the schema's
(``tasks.schemas.check_fields``) and the deployment's (``tasks.keys.request_problems``: model,
prompt length, size rules, limits) on the fields that passed the schema. The image is read only
once all of that holds (it may be in storage). Never retried, no model time spent. Storage that
cannot be reached for the image is ``StorageUnavailable`` (retried, as for uploads).
"""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_task_logger

from tasks.errors import InvalidRequest
from tasks.images import ConditioningImage, check_data_url, check_image, parse_ref
from tasks.keys import RenderSpec, object_key, request_problems, resolve
from tasks.pipeline import resources
from tasks.schemas import Limits, RenderRequest, check_fields, invalid
from worker_config.settings import get_settings

__all__ = ["validate", "Validated"]

log = get_task_logger("tasks.render")

Validated = tuple[RenderRequest, RenderSpec, str, ConditioningImage | None]


def validate(task_id: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Validated:
    """(request, resolved spec, object key, the checked image or None) of one task's arguments."""
    if args:
        raise InvalidRequest(
            f"invalid render request: tasks.render takes keyword arguments only, got {len(args)} positional; "
            "send kwargs={'prompt': ...}"
        )
    request, given, problems = check_fields(kwargs)
    served, limits = get_settings().MODEL_ID, resources.limits()
    problems += request_problems(given, served, limits, {problem.field for problem in problems})
    if request is None or problems:
        raise invalid(problems)
    image = None if request.image is None else _image(request.image, limits)
    spec = resolve(request, served, task_id or "local", limits, image)
    return request, spec, object_key(spec), image


def _image(value: str, limits: Limits) -> ConditioningImage:
    """The request's image, read (inline, or from the farm's bucket), checked and stored at ``inputs/<sha256>``."""
    ref = parse_ref(value)
    store = resources.store()
    try:
        if ref.kind == "data":
            image = check_data_url(ref, limits.max_image_bytes, limits.max_image_pixels)
        else:
            if ref.bucket != store.bucket:
                raise ValueError(
                    f"image: {ref.describe()} is not in this farm's bucket; only s3://{store.bucket}/... may be "
                    "named (upload the file with `renderfarm upload-image`, or send it as a data URL)"
                )
            try:
                data = store.read_small(ref.key or "", limits.max_image_bytes)
            except ValueError as exc:
                raise ValueError(f"image: {ref.describe()}: {exc} (MAX_IMAGE_BYTES)") from None
            if data is None:
                raise ValueError(f"image: there is no object {ref.describe()}")
            image = check_image(data, limits.max_image_bytes, limits.max_image_pixels)
    except ValueError as exc:
        raise InvalidRequest(f"invalid render request: {exc}") from None
    if store.put_input(image.key, image.data, image.media_type):
        log.info("stored the request's image (%s, %dx%d, %d bytes) at %s", image.format, image.width, image.height,
                 len(image.data), image.key)  # fmt: skip
    return image
