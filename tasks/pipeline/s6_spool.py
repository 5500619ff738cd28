"""Stage 6, the spool: finished MP4s wait here, with their poster, spritesheet and metadata, until they are stored.

A render's MP4 and its metadata are kept here until the upload succeeded. When storage fails
and the task is retried, the retry finds the video here and uploads it: a storage outage never
costs a second render.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["SpooledVideo", "Spool"]


@dataclass(frozen=True)
class SpooledVideo:
    path: Path
    metadata: dict[str, str]
    poster: Path | None = None  # the JPEG beside it, when one was made
    spritesheet: Path | None = None  # likewise


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def video_path(self, key: str) -> Path:
        """Where the MP4 for ``key`` is written (the file name is the key's hash, never user text)."""
        return self.directory / Path(key).name

    def poster_path(self, key: str) -> Path:
        """Where the video's poster (JPEG) is written beside it."""
        return self.video_path(key).with_suffix(".jpg")

    def spritesheet_path(self, key: str) -> Path:
        """Where the video's spritesheet (JPEG) is written beside it."""
        return self.video_path(key).with_suffix(".sprites.jpg")

    def _meta_path(self, key: str) -> Path:
        return self.video_path(key).with_suffix(".json")

    def find(self, key: str) -> SpooledVideo | None:
        video, meta = self.video_path(key), self._meta_path(key)
        if not (video.is_file() and meta.is_file()):
            return None
        return self._spooled(key, json.loads(meta.read_text()))

    def commit(self, key: str, metadata: dict[str, str]) -> SpooledVideo:
        """Mark the MP4 at ``video_path(key)`` complete by writing its metadata (atomically)."""
        meta = self._meta_path(key)
        tmp = meta.with_suffix(f".{os.getpid()}.part")
        tmp.write_text(json.dumps(metadata, sort_keys=True))
        os.replace(tmp, meta)
        return self._spooled(key, metadata)

    def _spooled(self, key: str, metadata: dict[str, str]) -> SpooledVideo:
        poster, sheet = self.poster_path(key), self.spritesheet_path(key)
        return SpooledVideo(path=self.video_path(key), metadata=metadata, poster=poster if poster.is_file() else None,
                            spritesheet=sheet if sheet.is_file() else None)  # fmt: skip

    def discard(self, key: str) -> None:
        for path in (self._meta_path(key), self.video_path(key), self.poster_path(key), self.spritesheet_path(key)):
            path.unlink(missing_ok=True)

    def sweep(self, max_age_s: float) -> list[Path]:
        """Remove what no attempt will come back for; return what went.

        A spooled video older than ``max_age_s`` belongs to a task that gave up, or whose retry ran
        on another host (which renders it again: the spool is per host). A ``.part`` file
        (``<name>.<pid>.part``, being written) whose process is gone was left by a killed process.
        """
        now = time.time()
        removed = []
        for path in self.directory.iterdir():
            try:
                if not path.is_file():
                    continue
                age = now - path.stat().st_mtime
            except OSError:  # removed meanwhile
                continue
            if path.name.endswith(".part"):
                pid = path.name.rsplit(".", 2)[-2] if path.name.count(".") >= 2 else ""
                gone = pid.isdigit() and not psutil.pid_exists(int(pid))
                stale = gone or age > max_age_s
            else:
                stale = path.suffix in (".mp4", ".json", ".jpg") and age > max_age_s
            if stale:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed
