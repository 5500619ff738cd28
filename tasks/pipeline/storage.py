"""Object storage for finished videos, through the minio SDK.

One internal client does the I/O against ``MINIO_ENDPOINT``; presigned URLs are signed for
``MINIO_PUBLIC_ENDPOINT`` (what clients can reach) by a second client that never connects
(the region is given, so signing needs no network call). Buckets are created private, with the
farm's lifecycle rules (added to the bucket's own, never replacing them): checkpoints left behind
expire after ``CHECKPOINT_EXPIRY_DAYS``, and with ``RENDER_RETENTION_DAYS`` videos and input
images that many days after they were stored. Every storage failure becomes ``StorageUnavailable``
naming the endpoint and the operation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import StorageUnavailable
from worker_config.settings import Settings, endpoint_parts

if TYPE_CHECKING:
    from minio import Minio

__all__ = [
    "RETENTION_RULE_ID", "INPUTS_RETENTION_RULE_ID", "CHECKPOINTS_RULE_ID", "CHECKPOINT_EXPIRY_DAYS",
    "StoredVideo", "VideoStore", "poster_key", "spritesheet_key", "stored_metadata",
]  # fmt: skip

log = logging.getLogger("renderfarm.storage")
RETENTION_RULE_ID = "renderfarm-retention"
INPUTS_RETENTION_RULE_ID = "renderfarm-retention-inputs"
CHECKPOINTS_RULE_ID = "renderfarm-checkpoints"
# A checkpoint is deleted when its video is stored; one left behind (a render that failed for good,
# was cancelled, or waited in the queue longer than this) expires after a day, S3's shortest rule.
CHECKPOINT_EXPIRY_DAYS = 1

_META_PREFIX = "x-amz-meta-"


@dataclass(frozen=True)
class StoredVideo:
    key: str
    size_bytes: int
    metadata: dict[str, str]

    @property
    def poster_key(self) -> str | None:
        """The poster's key, beside the MP4; None for a video stored before posters existed."""
        return poster_key(self.key) if self.metadata.get("poster") == "jpeg" else None

    @property
    def spritesheet_key(self) -> str | None:
        """The spritesheet's key, beside the MP4; None for a video stored without one."""
        return spritesheet_key(self.key) if self.metadata.get("spritesheet") == "jpeg" else None


def poster_key(key: str) -> str:
    return key.removesuffix(".mp4") + ".jpg"


def spritesheet_key(key: str) -> str:
    return key.removesuffix(".mp4") + ".sprites.jpg"


def stored_metadata(metadata: Mapping[str, str], poster: bool, spritesheet: bool) -> dict[str, str]:
    """The MP4's metadata as stored: its own, and which images were stored beside it."""
    return {**metadata, **({"poster": "jpeg"} if poster else {}), **({"spritesheet": "jpeg"} if spritesheet else {})}


class VideoStore:
    """The bucket of rendered videos."""

    def __init__(self, settings: Settings) -> None:
        if not settings.MINIO_ACCESS_KEY or not settings.MINIO_SECRET_KEY:
            raise StorageUnavailable("MINIO_ACCESS_KEY and MINIO_SECRET_KEY must be set to store videos")
        self.bucket = settings.MINIO_BUCKET
        self.expires = dt.timedelta(seconds=settings.PRESIGN_EXPIRES_S)
        self._endpoint = settings.MINIO_ENDPOINT
        self._client = _client(settings, settings.MINIO_ENDPOINT, io_timeout=settings.STORAGE_TIMEOUT_S)
        self._signer = _client(settings, settings.public_endpoint, io_timeout=None)
        self._bucket_ready = False
        self._retention_days = settings.RENDER_RETENTION_DAYS

    def ensure_bucket(self) -> None:
        """Create the bucket (private: no policy) if it does not exist yet; apply the lifecycle rules."""
        if self._bucket_ready:
            return
        from minio.error import S3Error

        with self._errors("create bucket"):
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
        self._apply_lifecycle(self._retention_days)
        self._bucket_ready = True

    def _apply_lifecycle(self, days: int) -> None:
        """The bucket's lifecycle: checkpoints under CHECKPOINT_PREFIX expire after
        CHECKPOINT_EXPIRY_DAYS; with ``days``, videos under KEY_PREFIX and conditioning images under
        INPUT_PREFIX expire ``days`` after they were stored. Rules of other IDs are kept. A key
        without the right (compose's workers: minio-init applies them as the bucket's owner) is
        told once; storing videos goes on."""
        from minio.commonconfig import ENABLED, Filter
        from minio.error import S3Error
        from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

        from tasks.images import INPUT_PREFIX
        from tasks.keys import KEY_PREFIX
        from tasks.pipeline.checkpoints import CHECKPOINT_PREFIX

        wanted = [(CHECKPOINTS_RULE_ID, CHECKPOINT_PREFIX, CHECKPOINT_EXPIRY_DAYS)]
        if days:
            wanted += [(RETENTION_RULE_ID, KEY_PREFIX, days), (INPUTS_RETENTION_RULE_ID, INPUT_PREFIX, days)]
        ours = [Rule(ENABLED, rule_filter=Filter(prefix=prefix), rule_id=rule_id, expiration=Expiration(days=n))
                for rule_id, prefix, n in wanted]  # fmt: skip
        with self._errors("set the lifecycle rules"):
            try:
                current = self._client.get_bucket_lifecycle(self.bucket)
                kept = [r for r in (current.rules if current else []) if r.rule_id not in {w[0] for w in wanted}]
                self._client.set_bucket_lifecycle(self.bucket, LifecycleConfig([*kept, *ours]))
            except S3Error as exc:
                if exc.code != "AccessDenied":
                    raise
                log.warning(
                    "this key may not set bucket %r's lifecycle rules (%s; RENDER_RETENTION_DAYS=%d, checkpoints "
                    "expire after %d day): its owner must (compose's minio-init does)", self.bucket, exc.code, days,
                    CHECKPOINT_EXPIRY_DAYS,
                )  # fmt: skip

    def find(self, key: str) -> StoredVideo | None:
        """The stored video at ``key``, or None if there is none."""
        stat = self._stat(key)
        if stat is None:
            return None
        meta = {
            name.lower().removeprefix(_META_PREFIX): value
            for name, value in (stat.metadata or {}).items()
            if name.lower().startswith(_META_PREFIX)
        }
        return StoredVideo(key=key, size_bytes=int(stat.size or 0), metadata=meta)

    def put(
        self, key: str, path: Path, metadata: Mapping[str, str], poster: Path | None = None,
        spritesheet: Path | None = None,
    ) -> StoredVideo:  # fmt: skip
        """Upload the MP4 at ``path`` to ``key`` with ``metadata`` (x-amz-meta-*), its poster and
        spritesheet first: a stored MP4 whose metadata says ``poster: jpeg`` (``spritesheet: jpeg``)
        always has that image beside it."""
        self.ensure_bucket()
        for image, image_key in ((poster, poster_key(key)), (spritesheet, spritesheet_key(key))):
            if image is not None:
                with self._errors(f"upload {image_key}"):
                    self._client.fput_object(self.bucket, image_key, str(image), content_type="image/jpeg")
        stored = stored_metadata(metadata, poster is not None, spritesheet is not None)
        with self._errors(f"upload {key}"):
            self._client.fput_object(self.bucket, key, str(path), content_type="video/mp4", metadata=dict(stored))
        return StoredVideo(key=key, size_bytes=path.stat().st_size, metadata=stored)

    def put_input(self, key: str, data: bytes, content_type: str) -> bool:
        """Store a conditioning image at its content address ``key`` unless it is there; True if stored now."""
        import io

        if self._stat(key) is not None:
            return False
        with self._errors(f"upload {key}"):
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        return True

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store ``data`` at ``key``, replacing what is there (one PUT: readers see the old or the new)."""
        import io

        self.ensure_bucket()
        with self._errors(f"upload {key}"):
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def remove(self, key: str) -> None:
        """Delete the object at ``key`` (nothing there is no error)."""
        self.ensure_bucket()
        with self._errors(f"delete {key}"):
            self._client.remove_object(self.bucket, key)

    def read_small(self, key: str, max_bytes: int) -> bytes | None:
        """The object at ``key`` if it is at most ``max_bytes`` long (checked before the download);
        None if there is no such object. ``ValueError`` (naming the size) if it is larger."""
        stat = self._stat(key)
        if stat is None:
            return None
        if int(stat.size or 0) > max_bytes:
            raise ValueError(f"{int(stat.size or 0):,} bytes; at most {max_bytes:,} are allowed")
        with self._errors(f"download {key}"):
            response = self._client.get_object(self.bucket, key, length=max_bytes + 1)
            try:
                data = response.read(max_bytes + 1)
            finally:
                response.close()
                response.release_conn()
        if len(data) > max_bytes:  # replaced by a larger object since the stat
            raise ValueError(f"more than {max_bytes:,} bytes; at most {max_bytes:,} are allowed")
        return data

    def _stat(self, key: str) -> Any:
        from minio.error import S3Error

        self.ensure_bucket()
        with self._errors(f"stat {key}"):
            try:
                return self._client.stat_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    return None
                raise

    def presign(self, key: str) -> str:
        """A time-limited GET URL for clients, on the public endpoint."""
        return self._signer.presigned_get_object(self.bucket, key, expires=self.expires)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        from minio.error import MinioException
        from urllib3.exceptions import HTTPError

        try:
            yield
        except (MinioException, HTTPError, OSError) as exc:
            raise StorageUnavailable(
                f"object storage at {self._endpoint} failed to {action} in bucket {self.bucket!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def _client(settings: Settings, endpoint: str, io_timeout: float | None) -> Minio:
    import urllib3
    from minio import Minio

    host, secure = endpoint_parts(endpoint, settings.MINIO_SECURE)
    http = None
    if io_timeout is not None:
        import certifi

        http = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED",
            ca_certs=str(settings.MINIO_CA_BUNDLE) if settings.MINIO_CA_BUNDLE else certifi.where(),
            timeout=urllib3.Timeout(connect=io_timeout, read=max(io_timeout, 60.0)),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            maxsize=4,
        )
    return Minio(
        host,
        access_key=settings.MINIO_ACCESS_KEY,
        secret_key=settings.MINIO_SECRET_KEY,
        secure=secure,
        region=settings.MINIO_REGION,
        http_client=http,
    )
