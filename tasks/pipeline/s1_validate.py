"""Stage 1, ``validating``: the request, checked before any model work.

The keyword arguments are validated (``tasks.schemas``), the defaults of the served model filled
in and the deployment's limits checked (``tasks.keys.resolve``), and the object key computed. Any
problem is an ``InvalidRequest`` naming every bad field: never retried, no model time spent.
"""

from __future__ import annotations

from typing import Any

from tasks.errors import InvalidRequest
from tasks.keys import RenderSpec, object_key, resolve
from tasks.pipeline import resources
from tasks.schemas import RenderRequest, parse_request
from worker_config.settings import get_settings

__all__ = ["validate"]


def validate(
    task_id: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[RenderRequest, RenderSpec, str]:
    """(request, resolved spec, object key) of one task's arguments."""
    if args:
        raise InvalidRequest(
            f"invalid render request: tasks.render takes keyword arguments only, got {len(args)} positional; "
            "send kwargs={'prompt': ...}"
        )
    request = parse_request(kwargs)
    spec = resolve(request, get_settings().MODEL_ID, task_id or "local", resources.limits())
    return request, spec, object_key(spec)
