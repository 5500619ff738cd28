"""Deterministic names: the resolved render spec, its seed and its object key.

The object key is a hash of the normalised spec (model and every parameter after defaults,
seed included, and an image-conditioned render's image hash, ``image_sha256``), never user text.
The same spec always maps to the same key, so a redelivered task overwrites nothing new and an
identical request can be served from storage.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tasks.errors import InvalidRequest
from tasks.images import ConditioningImage
from tasks.profiles import image_models, profile_for
from tasks.schemas import Limits, RenderRequest
from tasks.webhook import check_url

__all__ = ["RenderSpec", "resolve", "check_model", "seed_for_task", "object_key", "KEY_PREFIX", "KEY_VERSION"]

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
    model = request.model or served_model
    if model not in limits.models:
        raise _invalid(f"model: {model!r} is not served by this queue; available: {', '.join(limits.models)}")
    if request.image is not None and not profile_for(model).takes_image:
        raise _invalid(
            f"image: {model} is a text-to-video model and takes no image; models that do: {', '.join(image_models())}"
        )
    return model


def resolve(
    request: RenderRequest, served_model: str, task_id: str, limits: Limits, image: ConditioningImage | None = None
) -> RenderSpec:
    """Fill defaults from the model profile and check the model's size rules and the deployment's limits.
    ``image``: the request's image, read and checked (``tasks.images``); its hash goes into the spec."""
    model = check_model(request, served_model, limits)
    if (image is None) != (request.image is None):
        raise ValueError("resolve: pass the request's image, checked, exactly when the request has one")
    if request.webhook_url is not None:
        try:
            check_url(request.webhook_url, limits.webhooks, resolve=False)  # no DNS here: the delivery resolves
        except ValueError as exc:
            raise _invalid(f"webhook_url: {exc}") from None
    # ``force`` and ``webhook_url`` decide what happens around the render, not its pixels or key.
    given = request.model_dump(exclude_none=True, exclude={"force", "webhook_url", "image"})
    profile = profile_for(model)
    spec: RenderSpec = {**profile.defaults(), **given, "model": model}
    if spec.get("seed") is None:
        spec["seed"] = seed_for_task(task_id)
    problems = [
        f"{side}: {given[side]} is not a multiple of {profile.size_multiple}, which {model} needs "
        f"(for example {given[side] // profile.size_multiple * profile.size_multiple or profile.size_multiple})"
        for side in ("height", "width")
        if side in given and given[side] % profile.size_multiple
    ]
    problems += [
        f"{field}: {len(given[field])} characters; at most {limits.max_prompt_chars} are allowed"
        for field in ("prompt", "negative_prompt")  # the model's own default negative prompt is not counted
        if field in given and len(given[field]) > limits.max_prompt_chars
    ]
    if problems:
        raise _invalid("; ".join(problems))
    budget = spec["width"] * spec["height"] * spec["num_frames"]
    if budget > limits.max_pixel_frames:
        raise _invalid(
            f"size: {spec['width']}x{spec['height']} x {spec['num_frames']} frames = {budget:,} pixel-frames; "
            f"this deployment allows at most {limits.max_pixel_frames:,} (MAX_PIXEL_FRAMES)"
        )
    resolved = {name: spec[name] for name in _SPEC_FIELDS}
    if image is not None:  # only then: the keys of text-to-video renders stay as they were
        resolved["image_sha256"] = image.sha256
    return resolved


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(f"invalid render request: {message}")


def object_key(spec: RenderSpec) -> str:
    """``renders/<2 hex>/<64 hex>.mp4`` from the spec's canonical JSON."""
    canonical = json.dumps({"v": KEY_VERSION, **spec}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{KEY_PREFIX}{digest[:2]}/{digest}.mp4"
