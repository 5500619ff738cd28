"""A FastVideo render's denoising state, in FastVideo's own worker process: resumed, and captured.

FastVideo's denoising loop (``DenoisingStage.forward``) runs in its worker process (the mp
executor's spawned worker, or a Ray actor), not in the pool process that holds the checkpoints.
The two share a host, so the state crosses as files beside the render's output (FastVideo's
``output_path``, which the worker sees on its batch), never through FastVideo's executor:

- ``<output>.resume.safetensors``: the state to continue from, written by the pool process before
  ``generate`` (``resume_path``). ``install`` wraps ``DenoisingStage.forward`` so that, when it is
  there and fits this loop (``denoising_state.check``: the scheduler, the latents' shape and this
  request's schedule), the stage starts from its latents (``batch.latents``: FastVideo's latent
  preparation has drawn the noise by then, and the loop reads the batch's latents once), the
  scheduler's state is put back (``set_timesteps`` ran in the timestep stage before), the generator's
  too, and the steps done are skipped (the loop's own ``if self.interrupt: continue``). A state that
  does not fit is ignored and the render starts from noise; ``resumed_from()`` says which.
- ``<output>.state-<step>.safetensors``: the state after a step, written when the pool process
  asks for it (``capture``, from ``fastvideo_steps``), then announced over the step channel.

The loop's latents after each step are the scheduler step's output: the wrapper records it (a
Wan2.2-TI2V image render blends its first frame in afterwards, which the resumed loop does again
before its first step, to the same values). On the first step after a resume the wrapper hands the
scheduler the saved latents as the sample: FastVideo's TI2V image path casts its starting latents to
bf16 before the loop, which an uninterrupted render does only to the noise. Only the standard
``DenoisingStage`` loop is covered: FastWan's distilled ``DmdDenoisingStage`` draws fresh noise at
each of its few steps and never calls ``scheduler.step`` (``capture`` answers None there).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.engines import DenoisingState, denoising_state

__all__ = ["install", "resume_path", "state_path", "capture", "resumed_from", "write_state"]

log = logging.getLogger("renderfarm.fastvideo.state")


def resume_path(output: str | Path) -> Path:
    """Where the pool process leaves the state a render continues from (``output``: its MP4's path)."""
    return Path(output).with_suffix(".resume.safetensors")


def state_path(output: str | Path, step: int) -> Path:
    """Where FastVideo's worker leaves the state after ``step`` of the render writing ``output``."""
    return Path(output).with_suffix(f".state-{step}.safetensors")


class _Loop:
    """The denoising loop running in this process: its stage, batch and latents after the last step."""

    def __init__(self, stage: Any, batch: Any) -> None:
        self.stage, self.batch = stage, batch
        self.latents: Any = None
        self.resumed_from = 0
        self.first_sample: Any = None  # the saved latents, handed to the first scheduler step after a resume

    def generator(self) -> Any:
        generator = getattr(self.batch, "generator", None)
        if isinstance(generator, list | tuple):
            generator = generator[0] if len(generator) == 1 else None
        return generator if hasattr(generator, "get_state") else None


_LOOP: list[_Loop | None] = [None]
_WRITING = threading.Lock()


def resumed_from() -> int:
    """The step the running loop continued from (0: from noise, or no loop)."""
    loop = _LOOP[0]
    return loop.resumed_from if loop is not None else 0


def capture(step: int, steps: int) -> DenoisingState | None:
    """The running loop's state after ``step`` (copies on its device), or None where it cannot be taken."""
    loop = _LOOP[0]
    if loop is None or loop.latents is None:
        return None
    try:
        return denoising_state.capture(step, steps, loop.latents, loop.stage.scheduler, loop.generator())
    except denoising_state.Uncapturable as exc:
        log.warning("no checkpoint from this loop: %s", exc)
        return None


def write_state(state: DenoisingState, step: int) -> Path | None:
    """Write ``state`` where the pool process looks for it; its path (None without a running render)."""
    loop = _LOOP[0]
    output = getattr(loop.batch, "output_path", None) if loop is not None else None
    if not output:
        return None
    path = state_path(output, step)
    with _WRITING:
        denoising_state.write(state, path)
    return path


def install() -> None:
    """In FastVideo's worker: the denoising stage resumes from a state and lets its state be captured (idempotent)."""
    from fastvideo.pipelines.stages.denoising import DenoisingStage

    forward = DenoisingStage.__dict__["forward"]
    if getattr(forward, "_renderfarm", False):
        return

    def forward_with_state(self: Any, batch: Any, fastvideo_args: Any) -> Any:
        with _running(self, batch):
            return forward(self, batch, fastvideo_args)

    forward_with_state._renderfarm = True  # type: ignore[attr-defined]
    DenoisingStage.forward = forward_with_state  # type: ignore[method-assign]


@contextlib.contextmanager
def _running(stage: Any, batch: Any) -> Iterator[None]:
    loop = _Loop(stage, batch)
    scheduler = stage.scheduler
    own_step = scheduler.step

    @functools.wraps(own_step)  # FastVideo reads the step's signature for its extra arguments
    def step(model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
        if loop.first_sample is not None:
            sample, loop.first_sample = loop.first_sample.to(sample.device), None
        out = own_step(model_output, timestep, sample, *args, **kwargs)
        loop.latents = out[0] if isinstance(out, tuple | list) else getattr(out, "prev_sample", out)
        return out

    _resume(loop)
    scheduler.step = step
    _LOOP[0] = loop
    try:
        yield
    finally:
        _LOOP[0] = None
        with contextlib.suppress(AttributeError):
            del scheduler.step  # the class's own again
        stage.interrupt = False


def _resume(loop: _Loop) -> None:
    """Continue from the state the pool process left for this render, if there is one and it fits."""
    output = getattr(loop.batch, "output_path", None)
    path = resume_path(output) if output else None
    if path is None or not path.is_file():
        return
    latents = loop.batch.latents
    try:
        state = denoising_state.read(path)
        denoising_state.check(state, loop.stage.scheduler, tuple(latents.shape), loop.stage.scheduler)
    except (denoising_state.StateMismatch, OSError, ValueError, KeyError) as exc:
        log.warning("cannot continue from %s (%s): rendering from the first step", path.name, exc)
        return
    restored = denoising_state.restore(state, loop.stage.scheduler, latents.device, loop.generator())
    loop.batch.latents = restored.to(dtype=latents.dtype)
    loop.first_sample = loop.batch.latents
    loop.stage.interrupt = denoising_state.SkipSteps(state.step)
    loop.resumed_from = state.step
    log.info("continuing from the state after step %d of %d", state.step, state.steps)
