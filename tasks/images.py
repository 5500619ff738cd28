"""Conditioning images: the ``image`` of an image-conditioned render, checked by its content.

A request for a model that takes an image (``Profile.takes_image``) may send ``image`` as

- a data URL, ``data:image/png|jpeg|webp;base64,...``, of at most ``MAX_IMAGE_BYTES`` decoded; or
- ``s3://<bucket>/<key>``: an object in the farm's own bucket (``MINIO_BUCKET``), for example one
  stored by ``renderfarm upload-image`` (``renderfarm.inputs.upload_image``), of at most
  ``MAX_IMAGE_BYTES``. Nothing is fetched from any other place: no http(s) URL, no other bucket.

``parse_ref`` checks the syntax (in the request's schema); ``check_image`` the bytes, in this order,
each a clear ``ValueError`` naming the field: the size in bytes; the format, by the bytes (PNG, JPEG
or WebP; a data URL whose media type says otherwise is refused); the width x height, read from the
header before a pixel is decoded (``MAX_IMAGE_PIXELS``: a few KB of PNG can hold gigapixels); one
frame only (no animation); and a full decode (a truncated or damaged file is refused).

A checked image is stored content-addressed, ``inputs/<sha256>.<ext>``, and its hash is part of the
video's object key (``tasks.keys``): the same prompt with another image is another video.

Pillow is imported only when bytes are checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

__all__ = [
    "INPUT_PREFIX", "MEDIA_TYPES", "MIN_SIDE", "ImageRef", "ConditioningImage", "parse_ref", "decode_data_url",
    "check_data_url", "check_image", "data_url",
]  # fmt: skip

INPUT_PREFIX = "inputs/"
MIN_SIDE = 16
# Pillow's format name -> (media type, file extension)
MEDIA_TYPES = {"PNG": ("image/png", "png"), "JPEG": ("image/jpeg", "jpg"), "WEBP": ("image/webp", "webp")}
_FORMAT_OF_MEDIA_TYPE = {media: fmt for fmt, (media, _) in MEDIA_TYPES.items()}
_DATA_URL = re.compile(r"^data:(?P<media>[a-z]+/[a-z0-9.+-]+);base64,(?P<payload>.*)$", re.DOTALL | re.IGNORECASE)
_S3_URL = re.compile(r"^s3://(?P<bucket>[^/]+)/(?P<key>.+)$")
_FORMS = "a data:image/png|jpeg|webp;base64,... URL or s3://<this farm's bucket>/<key>"


@dataclass(frozen=True)
class ImageRef:
    """Where the image is: inline (``media_type`` and base64 ``payload``) or in the bucket (``bucket``, ``key``)."""

    kind: str  # "data" | "s3"
    media_type: str | None = None
    payload: str | None = None
    bucket: str | None = None
    key: str | None = None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.kind == "s3" else f"a {self.media_type} data URL"


@dataclass(frozen=True)
class ConditioningImage:
    """A checked image: its bytes as sent, format, size and hash."""

    data: bytes
    format: str  # "PNG" | "JPEG" | "WEBP"
    width: int
    height: int
    sha256: str

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format][0]

    @property
    def key(self) -> str:
        """Where it is stored: ``inputs/<sha256>.<ext>``."""
        return f"{INPUT_PREFIX}{self.sha256}.{MEDIA_TYPES[self.format][1]}"

    @property
    def data_url(self) -> str:
        return _data_url(self.media_type, self.data)


def _data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def parse_ref(value: str) -> ImageRef:
    """The syntax of an ``image`` value; ``ValueError`` saying which forms are allowed."""
    if match := _DATA_URL.match(value):
        media = match["media"].lower()
        if media not in _FORMAT_OF_MEDIA_TYPE:
            raise ValueError(
                f"data URL of type {media}; allowed: {', '.join(sorted(_FORMAT_OF_MEDIA_TYPE))} (base64-encoded)"
            )
        return ImageRef("data", media_type=media, payload=match["payload"])
    if value.startswith("data:"):
        raise ValueError(f"not a base64 image data URL; use {_FORMS}")
    if match := _S3_URL.match(value):
        return ImageRef("s3", bucket=match["bucket"], key=match["key"])
    scheme = value.split(":", 1)[0] if ":" in value[:12] else None
    fetched = scheme in ("http", "https", "ftp", "file")
    what = f"{scheme}:// URLs are not fetched" if fetched else "not an image reference"
    raise ValueError(f"{what}; use {_FORMS}")


def decode_data_url(ref: ImageRef, max_bytes: int) -> bytes:
    """The bytes of a data URL, refused before decoding when they would exceed ``max_bytes``."""
    payload = "".join((ref.payload or "").split())  # base64 in a data URL may be wrapped
    size = len(payload) * 3 // 4 - payload[-2:].count("=")  # what it decodes to, if it is valid base64
    if size > max_bytes:
        raise ValueError(f"image: {size:,} bytes; at most {max_bytes:,} are allowed (MAX_IMAGE_BYTES)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image: the data URL's payload is not valid base64") from None


def check_data_url(ref: ImageRef, max_bytes: int, max_pixels: int) -> ConditioningImage:
    """A data URL's image, decoded (``decode_data_url``) and checked with its media type (``check_image``)."""
    return check_image(decode_data_url(ref, max_bytes), max_bytes, max_pixels, declared=ref.media_type)


def check_image(data: bytes, max_bytes: int, max_pixels: int, declared: str | None = None) -> ConditioningImage:
    """Check an image's bytes (see the module's docstring); ``declared`` is a data URL's media type."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise ValueError(f"image: {len(data):,} bytes; at most {max_bytes:,} are allowed (MAX_IMAGE_BYTES)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked next
        try:
            image = Image.open(BytesIO(data), formats=list(MEDIA_TYPES))
        except Image.DecompressionBombError as exc:
            raise ValueError(f"image: too many pixels ({exc}); at most {max_pixels:,} (MAX_IMAGE_PIXELS)") from None
        except (UnidentifiedImageError, OSError):
            raise ValueError(
                "image: the bytes are not a PNG, JPEG or WebP image (the format is read from the content, "
                "not from a name or media type)"
            ) from None
    with image:
        fmt = image.format or ""
        width, height = image.size
        if declared is not None and _FORMAT_OF_MEDIA_TYPE.get(declared) != fmt:
            raise ValueError(f"image: the data URL says {declared} but the bytes are a {fmt} image")
        if width * height > max_pixels:
            raise ValueError(
                f"image: {width}x{height} = {width * height:,} pixels; at most {max_pixels:,} are allowed "
                "(MAX_IMAGE_PIXELS)"
            )
        if min(width, height) < MIN_SIDE:
            raise ValueError(f"image: {width}x{height}; each side must be at least {MIN_SIDE} pixels")
        frames = int(getattr(image, "n_frames", 1))
        if frames > 1:
            raise ValueError(f"image: an animated {fmt} ({frames} frames); send a single image")
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"image: the {fmt} data is damaged or truncated ({exc})") from None
    return ConditioningImage(data, fmt, width, height, hashlib.sha256(data).hexdigest())


def data_url(source: str | Path | bytes) -> str:
    """A data URL for a local image file (or its bytes), its media type read from the content.

    For producers: ``render.delay(prompt=..., model="tiny-wan-ti2v", image=data_url("cat.png"))``.
    """
    from PIL import Image, UnidentifiedImageError

    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        with Image.open(BytesIO(data), formats=list(MEDIA_TYPES)) as image:
            media = MEDIA_TYPES[image.format or ""][0]
    except (UnidentifiedImageError, OSError, KeyError):
        raise ValueError("not a PNG, JPEG or WebP image") from None
    return _data_url(media, data)
