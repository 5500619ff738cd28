"""OpenAI's video request to a render request, and a render's state to OpenAI's video object.

- ``prompt``, ``model``, ``size``, ``seconds``: strings (a JSON value of another type is refused,
  never converted); ``model`` one of the gateway's models (``API_MODELS``), default the first.
- ``size`` is ``"WxH"`` (width x height) in ASCII digits, within the model's size rules; default:
  the model's.
- ``seconds`` (ASCII digits, up to 6 decimals) becomes frames at the model's fps, rounded up to
  Wan's 4k+1 rule: ``num_frames = 4 * ceil(seconds * fps / 4) + 1`` (FastWan2.1 at 16 fps: 5 s is 81
  frames; FastWan2.2 at 24 fps: 5 s is 121). Default: the model's own length. It is echoed
  normalised (``"05.50"`` is shown ``"5.5"``).
- Then the checks a worker makes (``tasks.schemas``, ``tasks.keys.request_problems``: prompt
  rules and length, sizes, frames, ``MAX_PIXEL_FRAMES``), so a request the gateway queues is one a
  worker accepts. Every problem is reported at once, each naming its OpenAI parameter.
- ``input_reference`` (for models that take an image): the image, checked like a worker checks it
  (``tasks.images``), sent to the queue as the render's ``image`` (a data URL).
- ``DELETE``'s ``cancellation`` (a video still queued or rendering): what the cancel came to
  (``tasks.cancel.Cancellation``): ``outcome``, ``message`` and where it stopped or what it holds.
- ``status``: a queued task is ``queued``; started, rendering or waiting to retry, ``in_progress``
  with ``progress`` from its denoising steps (0-99); stored, ``completed`` (100); failed or
  cancelled, ``failed`` with the error.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from renderfarm.api.errors import quoted
from tasks.images import check_data_url, check_image, parse_ref
from tasks.keys import request_problems
from tasks.profiles import image_models, profile_for
from tasks.schemas import Limits, Problem, check_fields

if TYPE_CHECKING:
    from tasks.cancel import Cancellation

__all__ = [
    "BadParameter", "PARAMETERS", "cancellation_of", "parse_seconds", "parse_size", "render_kwargs", "reference_image",
    "shown_size_and_seconds", "video_object",
]  # fmt: skip

PARAMETERS = ("prompt", "model", "size", "seconds")  # and input_reference, read apart (a file, or a data URL)
# The render request's fields each OpenAI parameter feeds: a field's problem names the parameter.
_PARAMETER_OF = {"prompt": "prompt", "model": "model", "height": "size", "width": "size", "size": "size",
                 "num_frames": "seconds"}  # fmt: skip
_ORDER = (*PARAMETERS, "input_reference")
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
_SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")
_SEND_THE_IMAGE = "send the image itself: a multipart file, or in JSON a data:image/png|jpeg|webp;base64,... URL"
_JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}


class BadParameter(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` in ASCII digits (five at most a side): (width, height); BadParameter otherwise."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise BadParameter("size", f"size: invalid size {quoted(text)}: expected WIDTHxHEIGHT in pixels, ASCII "
                           "digits, e.g. 832x480")  # fmt: skip
    return int(match[1]), int(match[2])


def parse_seconds(text: str) -> Decimal:
    """A positive number of seconds in ASCII digits, up to 6 decimals (exact: no float rounding); BadParameter."""
    if _SECONDS.fullmatch(text) is None or Decimal(text) == 0:
        raise BadParameter("seconds", f"seconds: invalid seconds {quoted(text)}: a positive number in ASCII digits, "
                           'e.g. "4" or "2.5"')  # fmt: skip
    return Decimal(text)


def shown_size_and_seconds(kwargs: dict[str, Any], params: dict[str, str]) -> tuple[str, str]:
    """The video object's ``size`` and ``seconds`` for a render request: as asked (normalised), else the model's."""
    profile = profile_for(kwargs["model"])
    size = f"{kwargs.get('width', profile.width)}x{kwargs.get('height', profile.height)}"
    if "seconds" in params:
        return size, format(parse_seconds(params["seconds"]).normalize(), "f")
    return size, f"{(profile.num_frames - 1) / profile.fps:g}"


def render_kwargs(params: dict[str, Any], limits: Limits) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The render request for OpenAI's ``prompt``, ``model``, ``size``, ``seconds`` (``limits.models``:
    the gateway's), and every problem with them as ``(param, message)``: empty when it can be queued."""
    problems = [(name, f"{name}: unknown parameter; allowed: prompt, model, seconds, size")
                for name in sorted(set(params) - set(PARAMETERS))]  # fmt: skip
    text: dict[str, str] = {}
    for name in (n for n in PARAMETERS if n in params):
        if isinstance(params[name], str):
            text[name] = params[name]
        else:
            got = _JSON_TYPES.get(type(params[name]), "a file" if isinstance(params[name], bytes) else "another type")
            problems.append((name, f"{name}: expected a string, got {got}"))
    model = text.get("model", limits.models[0])
    failed: set[str] = {name for name in ("prompt", "model") if name in params and name not in text}  # wrong type
    kwargs: dict[str, Any] = {"prompt": text["prompt"]} if "prompt" in text else {}
    if "model" in text and model not in limits.models:
        problems.append(("model", f"model: invalid model {quoted(model)}; available: {', '.join(limits.models)}"))
        failed.add("model")
    elif "model" not in failed:
        kwargs["model"] = model
    if "size" in text:
        try:
            kwargs["width"], kwargs["height"] = parse_size(text["size"])
        except BadParameter as exc:
            problems.append((exc.param, str(exc)))
    if "size" in params and "width" not in kwargs:
        failed |= {"width", "height"}
    seconds = None
    if "seconds" in text:
        try:
            seconds = parse_seconds(text["seconds"])
        except BadParameter as exc:
            problems.append((exc.param, str(exc)))
    if seconds is not None and "model" not in failed:  # frames at the model's fps
        kwargs["num_frames"] = 4 * math.ceil(seconds * profile_for(model).fps / 4) + 1
    elif "seconds" in params:
        failed.add("num_frames")
    # The worker's own checks on what parsed: schema (types, bounds), then the deployment's rules.
    _, given, found = check_fields(kwargs)
    found = [p for p in found if p.field not in failed]
    found += request_problems(given, model, limits, failed | {p.field for p in found})
    problems += [_as_parameter(p, kwargs, model) for p in found]
    return kwargs, sorted(problems, key=lambda p: _ORDER.index(p[0]) if p[0] in _ORDER else len(_ORDER))


def _as_parameter(problem: Problem, kwargs: dict[str, Any], model: str) -> tuple[str, str]:
    """A render field's problem as OpenAI's parameter's: ``height: ...`` is ``size: height: ...``."""
    param = _PARAMETER_OF.get(problem.field, problem.field)
    message = str(problem) if param == problem.field else f"{param}: {problem}"
    if problem.field == "num_frames":
        message += f" (the seconds give {kwargs['num_frames']} frames at {profile_for(model).fps} fps)"
    return param, message


def reference_image(reference: bytes | str, model: str, max_bytes: int, max_pixels: int) -> str:
    """The render's ``image`` for ``input_reference`` (an uploaded file, or a data URL in JSON): a data
    URL of the checked bytes (it travels in the queue's message; the worker checks it again and
    stores it). BadParameter naming ``input_reference``: a model without images, or a bad image."""
    if not profile_for(model).takes_image:
        raise BadParameter("input_reference", f"input_reference: {model} is a text-to-video model and takes no "
                           f"image; models that do: {', '.join(image_models())}")  # fmt: skip
    try:
        if isinstance(reference, str):
            try:
                ref = parse_ref(reference)
            except ValueError as exc:  # it names the worker's forms, s3:// among them: not the gateway's
                raise ValueError(f"{str(exc).split(';')[0]}; {_SEND_THE_IMAGE}") from None
            if ref.kind != "data":
                raise ValueError(f"{ref.kind}:// URLs are not read here; {_SEND_THE_IMAGE}")
            image = check_data_url(ref, max_bytes, max_pixels)
        else:
            image = check_image(reference, max_bytes, max_pixels)
    except ValueError as exc:
        raise BadParameter("input_reference", f"input_reference: {str(exc).removeprefix('image: ')}") from None
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


def cancellation_of(outcome: Cancellation) -> dict[str, Any]:
    """``DELETE``'s account of a cancel: the outcome, one line for a person, and the details it has
    (``stage``/``step``/``steps`` where it stopped or runs, ``key`` of a video that had finished)."""
    shown = {"outcome": outcome.outcome.value, "message": outcome.message()}
    for name in ("stage", "step", "steps", "key"):
        if (value := getattr(outcome, name)) is not None:
            shown[name] = value
    return shown
