"""What every render in a pool process shares, made there on first use: the storage client, the
spool, the request limits and the webhook policy, all from the worker's settings."""

from __future__ import annotations

import functools

from tasks.pipeline.s6_spool import Spool
from tasks.pipeline.storage import VideoStore
from tasks.schemas import Limits
from tasks.webhook import WebhookPolicy
from worker_config.settings import get_settings

__all__ = ["store", "spool", "limits", "webhook_policy"]


@functools.cache
def store() -> VideoStore:
    return VideoStore(get_settings())


@functools.cache
def spool() -> Spool:
    return Spool(get_settings().SPOOL_DIR)


@functools.cache
def limits() -> Limits:
    s = get_settings()
    return Limits(
        max_prompt_chars=s.MAX_PROMPT_CHARS, max_pixel_frames=s.MAX_PIXEL_FRAMES, models=(s.MODEL_ID,),
        max_image_bytes=s.MAX_IMAGE_BYTES, max_image_pixels=s.MAX_IMAGE_PIXELS, webhooks=webhook_policy(),
    )  # fmt: skip


def webhook_policy() -> WebhookPolicy:
    """This deployment's webhook allow-list and whether a signing secret is set."""
    settings = get_settings()
    return WebhookPolicy.parse(settings.WEBHOOK_ALLOWED_HOSTS, settings.WEBHOOK_SECRET)
