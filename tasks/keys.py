"""Deterministic names: the resolved render spec, its seed and its object key.

The object key is a hash of the normalised spec (model and every parameter after defaults,
seed included), never user text. The same spec always maps to the same key, so a redelivered
task overwrites nothing new and an identical request can be served from storage.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tasks.errors import InvalidRequest
from tasks.profiles import profile_for
from tasks.schemas import Limits, RenderRequest
from tasks.webhook import check_url

__all__ = ["RenderSpec", "resolve", "seed_for_task", "object_key", "KEY_PREFIX", "KEY_VERSION"]

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


def resolve(request: RenderRequest, served_model: str, task_id: str, limits: Limits) -> RenderSpec:
    """Fill defaults from the model profile and check the model's size rules and the deployment's limits."""
    model = request.model or served_model
    if model not in limits.models:
        raise _invalid(f"model: {model!r} is not served by this queue; available: {', '.join(limits.models)}")
    if request.webhook_url is not None:
        try:
            check_url(request.webhook_url, limits.webhooks, resolve=False)  # no DNS here: the delivery resolves
        except ValueError as exc:
            raise _invalid(f"webhook_url: {exc}") from None
    # ``force`` and ``webhook_url`` decide what happens around the render, not its pixels or key.
    given = request.model_dump(exclude_none=True, exclude={"force", "webhook_url"})
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
    return {name: spec[name] for name in _SPEC_FIELDS}


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(f"invalid render request: {message}")


def object_key(spec: RenderSpec) -> str:
    """``renders/<2 hex>/<64 hex>.mp4`` from the spec's canonical JSON."""
    canonical = json.dumps({"v": KEY_VERSION, **spec}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{KEY_PREFIX}{digest[:2]}/{digest}.mp4"
