"""Engines: one small interface, several implementations, imported lazily.

This module is the interface (``Engine``, ``RenderOutput``, ``ProgressFn``) and the choice of an
engine for the settings. An engine is built once per pool child (``tasks.worker.lifecycle`` loads
it into ``holder.ENGINE``) and then renders one spec at a time (``tasks.pipeline.s4_generate``).
Importing this package imports no torch: the implementations are imported by
``holder.load_engine`` only in worker processes.

- ``diffusers_engine``: WanPipeline (the CPU engine for tiny-wan, and a fallback).
- ``fastvideo_engine``: FastVideo's ``VideoGenerator``, with ``fastvideo_worker`` (its mp worker's
  entry point), ``fastvideo_ray`` (its Ray executor in a pool process), ``fastvideo_steps`` (its
  denoising loop, in its own worker process, connected to the pool process step by step),
  ``fastvideo_state`` (that loop's state, resumed and captured there), ``fastvideo_cpu``
  (FastVideo without an accelerator) and ``fastvideo_mp4`` (its MP4s written by ``mp4``).
- ``mp4``: frames to an MP4, the one encoder of every stored video.
- ``tiny_wan``: the built-in random-weight checkpoints (``tiny-wan``, ``tiny-wan-ti2v``).
- ``conditioning``: an image-conditioned render's first frame, the same for every engine.
- ``denoising_state``: a denoising loop's state (latents, the scheduler's whole state, the
  generator's), captured at a step boundary and restored before the next step.
- ``holder``: the one owner of a process's engine, and ``load_engine``. ``peak_memory``: a render's peak memory.
  ``oom`` and ``second_try``: one more try after an out-of-memory or a lost engine worker.

May import the producer's face (errors, keys) and the configuration; imported by the pipeline and
the worker process, never by the face.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from tasks.images import ConditioningImage
    from worker_config.settings import Settings

__all__ = ["Engine", "RenderOutput", "ProgressFn", "Denoising", "DenoisingState", "choose_engine", "resolve_model_path"]

# progress(stage, step, steps): stage is one of "encoding_prompt", "denoising", "decoding". An
# engine reports ("denoising", 0, steps) before its first denoising step: the task waits there for
# storage's answer to its lookup, and may stop the render by raising from the callback.
ProgressFn = Callable[[str, "int | None", "int | None"], None]


@dataclass
class RenderOutput:
    """What an engine hands back: raw frames to encode, or an MP4 it already wrote."""

    frames: np.ndarray | None = None
    video_path: Path | None = None
    # What the engine measured: "peak_memory_mb" and "memory_source" (where the model runs), timings.
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class DenoisingState:
    """What a denoising loop needs to go on exactly where it stopped: after ``step`` of ``steps``.

    ``tensors`` (name to ``torch.Tensor``, on any device until ``to_host``) are the latents, the
    scheduler's tensors (its multistep history included) and the generator's state; ``values``
    are plain JSON values (the scheduler's counters, which tensors form a list, the engine's
    ``kind`` of state). Made and read by ``tasks.engines.denoising_state``; what is kept of it,
    and where, is the pipeline's business (``tasks.pipeline.checkpoints``).
    """

    step: int
    steps: int
    tensors: dict[str, Any]
    values: dict[str, Any]

    def to_host(self) -> DenoisingState:
        """The same state with every tensor copied to the CPU (call it off the render's thread)."""
        return DenoisingState(self.step, self.steps, {n: t.to("cpu") for n, t in self.tensors.items()}, self.values)

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in self.tensors.values())


class Denoising(Protocol):
    """What an engine's denoising loop asks of the pipeline besides reporting progress.

    Called on the render's side, in this order: ``resume`` once before the first denoising step
    (the state to continue from, or None: start from noise); ``started`` once, with the step the
    loop really starts after (0, or the resumed state's step; an engine that cannot use the state
    it was given starts from 0); then after each step ``wants_state`` and, when it says yes, the
    state after that step (or, where the loop runs in another process, after the next one) to
    ``take_state``, whose tensors may still be on the device.
    """

    def resume(self, steps: int) -> DenoisingState | None: ...

    def started(self, step: int) -> None: ...

    def wants_state(self, step: int) -> bool: ...

    def take_state(self, state: DenoisingState) -> None: ...


class Engine(Protocol):
    name: str
    model_id: str
    device: str

    def render(
        self, spec: dict[str, Any], progress: ProgressFn, image: ConditioningImage | None = None,
        denoising: Denoising | None = None,
    ) -> RenderOutput: ...  # fmt: skip

    def close(self) -> None: ...


def choose_engine(settings: Settings) -> str:
    """ENGINE if set; otherwise diffusers for the built-in tiny models (the CPU default), fastvideo for real ones."""
    if settings.ENGINE:
        return settings.ENGINE
    from tasks.engines.tiny_wan import TINY_MODELS

    return "diffusers" if settings.MODEL_ID in TINY_MODELS else "fastvideo"


def resolve_model_path(settings: Settings) -> str:
    """The path or hub id to load: a built-in tiny model is built (once) into the model cache."""
    from tasks.engines.tiny_wan import TINY_MODELS, ensure_tiny_model

    if settings.MODEL_ID in TINY_MODELS:
        return str(ensure_tiny_model(settings.MODEL_ID, settings.MODEL_CACHE_DIR))
    return settings.MODEL_ID
