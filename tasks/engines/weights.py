"""The model's weights: where they come from, at which revision, and fetching them ahead of time.

- ``tiny-wan``, ``tiny-wan-ti2v``: built into ``MODEL_CACHE_DIR`` (``tasks.engines.tiny_wan``).
- a local directory: used as it is.
- a Hugging Face Hub id: downloaded into the Hugging Face cache (``HF_HOME``; the image keeps it on
  its volume) at ``MODEL_REVISION`` (a commit hash pins the exact weights; unset follows ``main``).
  Both engines load it at that revision: diffusers through ``from_pretrained(revision=...)``,
  FastVideo through its own ``revision`` option.

``fetch`` (``renderfarm fetch-model``) downloads them before a worker starts, so that a first
start is a model load, not a download of many GB under a start-up probe. Imports no torch for a
Hub model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from worker_config.settings import Settings

__all__ = ["Fetched", "WeightsUnavailable", "fetch", "hub_revision", "is_hub_model"]


class WeightsUnavailable(RuntimeError):
    """The weights could not be fetched; the message says what was asked and what to check."""


@dataclass(frozen=True)
class Fetched:
    model: str
    revision: str | None
    path: Path
    size_bytes: int
    seconds: float


def is_hub_model(settings: Settings) -> bool:
    from tasks.engines.tiny_wan import TINY_MODELS

    return settings.MODEL_ID not in TINY_MODELS and not Path(settings.MODEL_ID).expanduser().is_dir()


def hub_revision(settings: Settings) -> str | None:
    """The revision to load: ``MODEL_REVISION`` for a Hub model, None for a built-in model or a local directory."""
    return settings.MODEL_REVISION if is_hub_model(settings) else None


def fetch(settings: Settings) -> Fetched:
    """Make the weights of ``MODEL_ID`` (at ``MODEL_REVISION``) local; where they are and their size."""
    started = time.perf_counter()
    from tasks.engines.tiny_wan import TINY_MODELS, ensure_tiny_model

    if settings.MODEL_ID in TINY_MODELS:
        path = Path(ensure_tiny_model(settings.MODEL_ID, settings.MODEL_CACHE_DIR))
    elif not is_hub_model(settings):
        path = Path(settings.MODEL_ID).expanduser()
    else:
        path = _download(settings.MODEL_ID, settings.MODEL_REVISION)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return Fetched(settings.MODEL_ID, hub_revision(settings), path, size, time.perf_counter() - started)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    asked = f"MODEL_ID={repo_id} at MODEL_REVISION={revision or 'main (unset)'}"
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except GatedRepoError as exc:
        hint = "the model is gated: accept its licence on huggingface.co and set HF_TOKEN"
        raise WeightsUnavailable(f"cannot fetch {asked}: {hint} ({type(exc).__name__})") from None
    except RevisionNotFoundError:
        hint = "no such revision: MODEL_REVISION must be a commit hash, branch or tag of that repository"
        raise WeightsUnavailable(f"cannot fetch {asked}: {hint}") from None
    except RepositoryNotFoundError:
        hint = "no such repository, or a private one: check MODEL_ID, and HF_TOKEN for private models"
        raise WeightsUnavailable(f"cannot fetch {asked}: {hint}") from None
    except LocalEntryNotFoundError as exc:
        hint = (
            "it is not in the Hugging Face cache (HF_HOME) and the Hub cannot be reached "
            "(HF_HUB_OFFLINE set, or no network)"
        )
        raise WeightsUnavailable(f"cannot fetch {asked}: {hint}: {exc}") from None
