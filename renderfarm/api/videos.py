"""OpenAI's video request to a render request, and a render's state to OpenAI's video object.

- ``size`` is ``"WxH"`` (width x height) within the model's size rules; default: the model's.
- ``seconds`` becomes frames at the model's fps, rounded up to Wan's 4k+1 rule:
  ``num_frames = 4 * ceil(seconds * fps / 4) + 1`` (FastWan2.1 at 16 fps: 5 s is 81 frames;
  FastWan2.2 at 24 fps: 5 s is 121). Default: the model's own length.
- ``input_reference`` (for models that take an image): the image, checked like a worker checks it
  (``tasks.images``), sent to the queue as the render's ``image`` (a data URL).
- ``status``: a queued task is ``queued``; started, rendering or waiting to retry, ``in_progress``
  with ``progress`` from its denoising steps (0-99); stored, ``completed`` (100); failed or
  cancelled, ``failed`` with the error.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from tasks.images import check_data_url, check_image, parse_ref
from tasks.profiles import image_models, profile_for
from tasks.schemas import RenderRequest

__all__ = ["BadParameter", "render_kwargs", "reference_image", "shown_size_and_seconds", "video_object"]

# The render request's fields each OpenAI parameter feeds: a field's error names the parameter.
_PARAMETER_OF = {"prompt": "prompt", "height": "size", "width": "size", "num_frames": "seconds", "model": "model"}


class BadParameter(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def shown_size_and_seconds(kwargs: dict[str, Any], params: dict[str, str]) -> tuple[str, str]:
    """The video object's ``size`` and ``seconds`` for a render request: as asked, else the model's own."""
    profile = profile_for(kwargs["model"])
    size = f"{kwargs.get('width', profile.width)}x{kwargs.get('height', profile.height)}"
    return size, params.get("seconds") or f"{(profile.num_frames - 1) / profile.fps:g}"


def render_kwargs(params: dict[str, str], models: tuple[str, ...]) -> dict[str, Any]:
    """The render request for OpenAI's ``prompt``, ``model``, ``size``, ``seconds``; BadParameter naming one."""
    unknown = set(params) - {"prompt", "model", "size", "seconds"}
    if unknown:
        name = sorted(unknown)[0]
        raise BadParameter(name, f"Unknown parameter: '{name}'. Allowed: prompt, model, seconds, size")
    if not models:
        raise BadParameter("model", "This server has no model configured (set API_MODELS or DEFAULT_MODEL)")
    model = params.get("model") or models[0]
    if model not in models:
        raise BadParameter("model", f"Invalid model '{model}'. Available: {', '.join(models)}")
    profile = profile_for(model)
    kwargs: dict[str, Any] = {"prompt": params.get("prompt", ""), "model": model}
    if "size" in params:
        width, _, height = params["size"].partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise BadParameter("size", f"Invalid size '{params['size']}': expected WIDTHxHEIGHT, e.g. 832x480")
        kwargs["width"], kwargs["height"] = int(width), int(height)
        multiple = profile.size_multiple
        if kwargs["width"] % multiple or kwargs["height"] % multiple:
            raise BadParameter("size", f"Invalid size '{params['size']}': {model} needs sides that are multiples of "
                               f"{multiple}")  # fmt: skip
    if "seconds" in params:
        try:
            seconds = float(params["seconds"])
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise BadParameter("seconds", f"Invalid seconds '{params['seconds']}': a positive number")
        kwargs["num_frames"] = 4 * math.ceil(seconds * profile.fps / 4) + 1
    try:
        RenderRequest.model_validate(kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "prompt"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = "required"
        param = _PARAMETER_OF.get(field, field)
        if field == "num_frames":
            message += f" (the seconds give {kwargs[field]} frames at {profile.fps} fps)"
        raise BadParameter(param, f"{param}: {message}") from None
    return kwargs


def reference_image(reference: bytes | str, model: str, max_bytes: int, max_pixels: int) -> str:
    """The render's ``image`` for ``input_reference`` (an uploaded file, or a data URL in JSON): a data
    URL of the checked bytes (it travels in the queue's message; the worker checks it again and
    stores it). BadParameter naming ``input_reference``: a model without images, or a bad image."""
    if not profile_for(model).takes_image:
        raise BadParameter("input_reference", f"input_reference: {model} is a text-to-video model and takes no "
                           f"image; models that do: {', '.join(image_models())}")  # fmt: skip
    try:
        if isinstance(reference, str):
            ref = parse_ref(reference)
            if ref.kind != "data":
                raise ValueError("image: send the image itself (a multipart file, or a data:image/...;base64 URL)")
            image = check_data_url(ref, max_bytes, max_pixels)
        else:
            image = check_image(reference, max_bytes, max_pixels)
    except ValueError as exc:
        raise BadParameter("input_reference", "input_reference" + str(exc).removeprefix("image")) from None
    return image.data_url


def video_object(record: dict[str, Any], state: str, info: Any) -> dict[str, Any]:
    """OpenAI's video object from the stored record and the task's state and info (result or error)."""
    video = {
        "id": record["id"], "object": "video", "model": record["model"], "prompt": record["prompt"],
        "size": record["size"], "seconds": record["seconds"], "created_at": record["created_at"],
        "expires_at": record["expires_at"], "completed_at": record.get("completed_at"),
        "remixed_from_video_id": None, "status": "queued", "progress": 0, "error": None,
    }  # fmt: skip
    if state in ("STARTED", "PROGRESS", "RETRY"):
        video["status"] = "in_progress"
        if isinstance(info, dict) and info.get("steps"):
            video["progress"] = min(99, int(100 * int(info.get("step", 0)) / int(info["steps"])))
    elif state == "SUCCESS":
        video["status"], video["progress"] = "completed", 100
    elif state in ("FAILURE", "REVOKED"):
        video["status"] = "failed"
        if state == "REVOKED":
            video["error"] = {"code": "cancelled", "message": "The render was cancelled"}
        else:
            video["error"] = {"code": type(info).__name__ if isinstance(info, BaseException) else "error",
                              "message": str(info)}  # fmt: skip
    return video
