"""API keys: stored as SHA-256 digests, compared in constant time; never logged.

``API_KEYS_FILE`` holds one ``name:sha256-hex`` line per key (``#`` comments allowed). A request
sends ``Authorization: Bearer <key>``; the key's name owns the videos it creates (a key lists,
reads and deletes only its own).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

__all__ = ["KeyRing", "new_key"]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(name: str) -> tuple[str, str]:
    """A fresh key and its line for the keys file."""
    key = "rf-" + secrets.token_urlsafe(32)
    return key, f"{name}:{digest(key)}"


class KeyRing:
    def __init__(self, path: Path) -> None:
        self._digests: list[tuple[str, str]] = []
        for number, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, _, hexdigest = line.partition(":")
            if not name or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
                raise ValueError(f"{path}:{number}: expected name:sha256-hex (64 lowercase hex digits)")
            self._digests.append((name, hexdigest))
        if not self._digests:
            raise ValueError(f"{path} holds no key: add one with `renderfarm api-key NAME >> {path}`")

    def owner(self, key: str) -> str | None:
        """The name of ``key``, or None; every stored digest is compared (no early exit)."""
        found = None
        presented = digest(key)
        for name, stored in self._digests:
            if hmac.compare_digest(presented, stored):
                found = name
        return found
