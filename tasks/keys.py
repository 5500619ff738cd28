"""Deterministic names: the resolved render spec, its seed and its object key.

The object key is a hash of the normalised spec (model and every parameter after defaults,
seed included, and an image-conditioned render's image hash, ``image_sha256``), never user text.
The same spec always maps to the same key, so a redelivered task overwrites nothing new and an
identical request can be served from storage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from typing import Any

from tasks.images import ConditioningImage
from tasks.profiles import image_models, profile_for
from tasks.schemas import Limits, Problem, RenderRequest, invalid
from tasks.webhook import check_url

__all__ = [
    "RenderSpec", "resolve", "check_model", "request_problems", "seed_for_task", "object_key", "KEY_PREFIX",
    "KEY_VERSION",
]  # fmt: skip

KEY_VERSION = 1
KEY_PREFIX = "renders/"  # every video's key starts here (the retention rule applies to it)

# The fields that decide the pixels (``force`` only decides whether to look in the cache).
_SPEC_FIELDS = (
    "prompt", "negative_prompt", "num_frames", "height", "width",
    "num_inference_steps", "guidance_scale", "seed", "fps", "model",
)  # fmt: skip

RenderSpec = dict[str, Any]


def seed_for_task(task_id: str) -> int:
    """A request without a seed gets one derived from its task id: stable across redeliveries."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big")


def check_model(request: RenderRequest, served_model: str, limits: Limits) -> str:
    """The model the request is for; ``InvalidRequest`` if it is not served here, or if it takes no
    image and the request sends one (checked before the image is read)."""
    found = [p for p in request_problems(request.model_dump(exclude_none=True), served_model, limits)
             if p.field in ("model", "image")]  # fmt: skip
    if found:
        raise invalid(found)
    return request.model or served_model


def request_problems(
    given: dict[str, Any], served_model: str, limits: Limits, failed: Collection[str] = ()
) -> list[Problem]:
    """What this deployment refuses in a request, every problem at once. ``given``: the fields that
    passed the schema (``tasks.schemas.check_fields``); ``failed``: those that did not, whose rules
    are skipped here (the others still apply). The model must be served here (and take an image if
    one is sent), the webhook's host be allowed, the sides be multiples of the model's, the prompts
    within ``max_prompt_chars`` and the video within ``max_pixel_frames``."""
    found: list[Problem] = []
    model = given.get("model") or served_model
    served = "model" not in failed and model in limits.models
    if "model" not in failed and not served:
        found.append(Problem("model", f"{model!r} is not served by this queue; available: {', '.join(limits.models)}"))
    if served and given.get("image") is not None and not profile_for(model).takes_image:
        found.append(Problem("image", f"{model} is a text-to-video model and takes no image; models that do: "
                             f"{', '.join(image_models())}"))  # fmt: skip
    if given.get("webhook_url") is not None:
        try:
            check_url(given["webhook_url"], limits.webhooks, resolve=False)  # no DNS here: the delivery resolves
        except ValueError as exc:
            found.append(Problem("webhook_url", str(exc)))
    found += [
        Problem(field, f"{len(given[field])} characters; at most {limits.max_prompt_chars} are allowed")
        for field in ("prompt", "negative_prompt")  # the model's own default negative prompt is not counted
        if field in given and len(given[field]) > limits.max_prompt_chars
    ]
    if not served:
        return found  # the size rules are the model's
    profile = profile_for(model)
    multiple = profile.size_multiple
    for side in ("height", "width"):
        if side in given and given[side] % multiple:
            example = given[side] // multiple * multiple or multiple
            found.append(Problem(side, f"{given[side]} is not a multiple of {multiple}, which {model} needs "
                                 f"(for example {example})"))  # fmt: skip
    if not {"height", "width", "num_frames"} & set(failed):  # else the defaults would stand in for them
        spec = {**profile.defaults(), **given}
        budget = spec["width"] * spec["height"] * spec["num_frames"]
        if budget > limits.max_pixel_frames:
            found.append(Problem("size", f"{spec['width']}x{spec['height']} x {spec['num_frames']} frames = "
                                 f"{budget:,} pixel-frames; this deployment allows at most "
                                 f"{limits.max_pixel_frames:,} (MAX_PIXEL_FRAMES)"))  # fmt: skip
    return found


def resolve(
    request: RenderRequest, served_model: str, task_id: str, limits: Limits, image: ConditioningImage | None = None
) -> RenderSpec:
    """Fill defaults from the model profile and check the model's size rules and the deployment's limits
    (``request_problems``: ``InvalidRequest`` naming every problem). ``image``: the request's image,
    read and checked (``tasks.images``); its hash goes into the spec."""
    if (image is None) != (request.image is None):
        raise ValueError("resolve: pass the request's image, checked, exactly when the request has one")
    # ``force`` and ``webhook_url`` decide what happens around the render, not its pixels or key.
    found = request_problems(request.model_dump(exclude_none=True), served_model, limits)
    if found:
        raise invalid(found)
    given = request.model_dump(exclude_none=True, exclude={"force", "webhook_url", "image"})
    model = request.model or served_model
    spec: RenderSpec = {**profile_for(model).defaults(), **given, "model": model}
    if spec.get("seed") is None:
        spec["seed"] = seed_for_task(task_id)
    resolved = {name: spec[name] for name in _SPEC_FIELDS}
    if image is not None:  # only then: the keys of text-to-video renders stay as they were
        resolved["image_sha256"] = image.sha256
    return resolved


def object_key(spec: RenderSpec) -> str:
    """``renders/<2 hex>/<64 hex>.mp4`` from the spec's canonical JSON."""
    canonical = json.dumps({"v": KEY_VERSION, **spec}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{KEY_PREFIX}{digest[:2]}/{digest}.mp4"
