"""Uploading a conditioning image: a local file into the farm's bucket, for ``image="s3://..."``.

``upload_image("cat.png")`` checks the file as a worker would (``tasks.images.check_image``: format
by content, size, pixels, one frame, a full decode), stores it at its content address
``inputs/<sha256>.<ext>`` (once: an image already there is not sent again) and returns
``s3://<MINIO_BUCKET>/inputs/<sha256>.<ext>``. Needs the storage settings (``MINIO_*``) a worker
has, its credentials included (``StorageUnavailable`` naming them otherwise). ``renderfarm
upload-image PATH`` does the same from the command line.

A request can also carry the image inline, ``image=tasks.images.data_url("cat.png")``: no storage
credentials needed, but the image travels in the broker's message (up to ``MAX_IMAGE_BYTES``).
"""

from __future__ import annotations

from pathlib import Path

from tasks.errors import StorageUnavailable
from tasks.images import check_image
from tasks.pipeline.storage import VideoStore
from worker_config.settings import Settings, get_settings

__all__ = ["upload_image"]


def upload_image(source: str | Path | bytes, settings: Settings | None = None) -> str:
    """Check and store an image; its ``s3://`` URL. ``ValueError`` naming what is wrong with it."""
    settings = settings or get_settings()
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    image = check_image(data, settings.MAX_IMAGE_BYTES, settings.MAX_IMAGE_PIXELS)
    if not settings.MINIO_ACCESS_KEY or not settings.MINIO_SECRET_KEY:
        raise StorageUnavailable(
            f"MINIO_ACCESS_KEY and MINIO_SECRET_KEY must be set to upload an image to the farm's bucket "
            f"({settings.MINIO_BUCKET!r} at MINIO_ENDPOINT={settings.MINIO_ENDPOINT}; the workers' storage "
            "credentials); or send the image inline instead: image=tasks.images.data_url(path)"
        )
    store = VideoStore(settings)
    store.put_input(image.key, image.data, image.media_type)
    return f"s3://{store.bucket}/{image.key}"
