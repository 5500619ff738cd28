"""Engines: one small interface, several implementations, imported lazily.

An engine is built once per pool child (``worker_config.lifecycle``) and then renders one spec
at a time. Importing this package imports no torch: the implementations are loaded by
``load_engine`` only in worker processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from worker_config.settings import Settings

__all__ = ["Engine", "RenderOutput", "ProgressFn", "load_engine", "choose_engine", "resolve_model_path"]

# progress(stage, step, steps): stage is one of "encoding_prompt", "denoising", "decoding". An
# engine reports ("denoising", 0, steps) before its first denoising step: the task waits there for
# storage's answer to its lookup, and may stop the render by raising from the callback.
ProgressFn = Callable[[str, "int | None", "int | None"], None]


@dataclass
class RenderOutput:
    """What an engine hands back: raw frames to encode, or an MP4 it already wrote."""

    frames: np.ndarray | None = None
    video_path: Path | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    name: str
    model_id: str
    device: str

    def render(self, spec: dict[str, Any], progress: ProgressFn) -> RenderOutput: ...

    def close(self) -> None: ...


def choose_engine(settings: Settings) -> str:
    """ENGINE if set; otherwise diffusers for tiny-wan (the CPU default) and fastvideo for real models."""
    if settings.ENGINE:
        return settings.ENGINE
    return "diffusers" if settings.MODEL_ID == "tiny-wan" else "fastvideo"


def resolve_model_path(settings: Settings) -> str:
    """The path or hub id to load: the built-in tiny-wan is built (once) into the model cache."""
    if settings.MODEL_ID == "tiny-wan":
        from tasks.engines.tiny_wan import ensure_tiny_wan

        return str(ensure_tiny_wan(settings.MODEL_CACHE_DIR))
    return settings.MODEL_ID


def load_engine(settings: Settings, name: str | None = None) -> Engine:
    """Build the engine ``name`` (default: ``choose_engine``) for ``settings.MODEL_ID``."""
    name = name or choose_engine(settings)
    if name == "diffusers":
        from tasks.engines.diffusers_engine import DiffusersEngine

        return DiffusersEngine(settings)
    if name == "fastvideo":
        from tasks.engines.fastvideo_engine import FastVideoEngine

        return FastVideoEngine(settings)
    raise ValueError(f"unknown engine {name!r}; allowed: fastvideo, diffusers")
