"""Stage 4, ``encoding_prompt``, ``denoising``, ``decoding``: the engine renders the frames.

The engine loaded in this process (``tasks.engines.holder.ENGINE``) renders the spec and reports
each stage and step through a callback, which moves the task's progress (``StageClock``), asks
whether the render must stop (``RenderStop``: ``RenderCancelled`` stops it at that step, or before
that stage: decoding included; ``WorkerShuttingDown`` the same way until the last denoising step)
and, before the first denoising step, waits for the storage lookup (``ServedFromStorage`` stops it there).
An out-of-memory gets one more try after memory is freed (``tasks.engines.oom``). The render's
peak memory is measured in this process around it (``tasks.engines.peak_memory``), unless the
engine measured it where the model runs (FastVideo's worker process: ``RenderOutput.stats``).

Checkpoints (``tasks.pipeline.checkpoints``) are reached at two points, through the engine's
``Denoising`` hooks (``_Denoising``): at the start of denoising (continue from a saved state?)
and after each step (is a save due? here is the state). A worker shutting down stops the render at
the next step, saves the state it stopped at (``HAND_BACK_SAVE_S`` at most) and raises
``WorkerShuttingDown``; the pipeline gives the task back to the queue.
"""

from __future__ import annotations

from celery import Task
from celery.utils.log import get_task_logger

from tasks.engines import DenoisingState, RenderOutput
from tasks.engines.holder import ENGINE
from tasks.engines.oom import with_one_oom_retry
from tasks.engines.peak_memory import PeakMemory
from tasks.images import ConditioningImage
from tasks.keys import RenderSpec, object_key
from tasks.pipeline import resources
from tasks.pipeline.cancelling import RenderStop
from tasks.pipeline.checkpoints import Checkpoints, Identity
from tasks.pipeline.events import denoised
from tasks.pipeline.progress import StageClock
from tasks.pipeline.s3_lookup import StorageLookup, serve_if_stored
from tasks.pipeline.stopping import WorkerShuttingDown
from worker_config.settings import Settings, get_settings

__all__ = ["generate", "Memory", "HAND_BACK_SAVE_S"]

log = get_task_logger("tasks.render")

# The render's peak memory in MiB and where it was measured ("cuda" | "rss"), or (None, None).
Memory = tuple[float | None, str | None]
# A worker shutting down waits this long at most for the checkpoint it stopped at: well inside a
# 30 s grace period (docs/deploy.md), with the step it finishes first and the process's exit.
HAND_BACK_SAVE_S = 15.0


def generate(
    task: Task,
    clock: StageClock,
    spec: RenderSpec,
    lookup: StorageLookup | None,
    image: ConditioningImage | None,
    stop: RenderStop,
) -> tuple[RenderOutput, str, Memory]:
    """(the engine's output, the engine's name, the render's peak memory); ``image`` conditions the render."""
    engine = ENGINE.get()
    denoising = _Denoising(clock, stop, _checkpoints(get_settings(), engine.name, spec))

    def progress(stage: str, step: int | None, steps: int | None) -> None:
        nonlocal lookup
        if stage == "denoising" and step is not None:
            denoising.reached(step)
        stop.check(stage, step, steps)
        # Engines report denoising step 0 before their first step: storage must have answered by then.
        if lookup is not None and (stage == "denoising" or lookup.done()):
            answered, lookup = lookup, None
            serve_if_stored(answered, clock)
        clock.progress(stage, step, steps)

    peak = PeakMemory(engine.device)
    peak.start()
    outcome = "failed"
    try:
        output = with_one_oom_retry(lambda: engine.render(spec, progress, image, denoising), spec, engine.device)
        outcome = "completed"
    except WorkerShuttingDown:
        outcome = "handed back"
        denoising.hand_back()
        raise
    except BaseException as exc:
        outcome = f"stopped ({type(exc).__name__})"
        raise
    finally:
        denoising.report(outcome)
    memory = peak.stop()
    if output.stats.get("peak_memory_mb") is not None:  # measured where the model runs (FastVideo's worker)
        memory = (output.stats["peak_memory_mb"], output.stats.get("memory_source"))
    serve_if_stored(lookup, clock)  # still unanswered only if the engine never reported a denoising step
    return output, engine.name, memory


def _checkpoints(settings: Settings, engine: str, spec: RenderSpec) -> Checkpoints | None:
    """This render's checkpoints (the search for a saved one starts now); None when they are off."""
    if not settings.CHECKPOINT_EVERY_S:
        return None
    from tasks.engines.tiny_wan import BUILD_VERSION, TINY_MODELS

    revision = f"built-in {BUILD_VERSION}" if settings.MODEL_ID in TINY_MODELS else settings.MODEL_REVISION or ""
    identity = Identity(object_key(spec), settings.MODEL_ID, revision, engine, dict(spec))
    return Checkpoints(resources.store(), identity, settings.CHECKPOINT_EVERY_S)


class _Denoising:
    """The engine's ``Denoising`` hooks for one delivery: checkpoints, and what a shutdown needs."""

    def __init__(self, clock: StageClock, stop: RenderStop, checkpoints: Checkpoints | None) -> None:
        self._clock, self._stop, self._checkpoints = clock, stop, checkpoints
        self._latest: DenoisingState | None = None
        self.first = 0  # the step this delivery's denoising started after
        self.last = 0  # the last step it reported
        self.steps: int | None = None

    def resume(self, steps: int) -> DenoisingState | None:
        self.steps = steps
        return self._checkpoints.resume() if self._checkpoints is not None else None

    def started(self, step: int) -> None:
        self.first = self.last = step
        if step:
            self._clock.resumed_from = step  # in every PROGRESS update from now on
        if self._checkpoints is not None:
            self._checkpoints.started(step)

    def wants_state(self, step: int) -> bool:
        if self._checkpoints is None:
            return False
        if self._stop.shutting_down():
            return True  # the state this render stops at (or, past the last step, finishes from)
        return step < (self.steps or step + 1) and self._checkpoints.due()

    def take_state(self, state: DenoisingState) -> None:
        # A loop in another process (FastVideo's worker) may be ahead of the steps it has reported.
        self.reached(state.step)
        if self._checkpoints is None:
            return
        if self._stop.shutting_down() and state.step < state.steps:
            if self._latest is None or state.step > self._latest.step:
                self._latest = state  # saved by hand_back, where the render stops
            return
        self._checkpoints.save(state)  # in the background (its tensors are held only until it is stored)

    def reached(self, step: int) -> None:
        """The engine reported ``step`` done (or, at 0 or a resumed step, about to start)."""
        if step > self.last:
            denoised.send(sender=self, steps=step - self.last)
            self.last = step

    def hand_back(self) -> None:
        """The worker is shutting down: store the state this render stopped at, within ``HAND_BACK_SAVE_S``."""
        if self._checkpoints is None or self._latest is None:
            return
        if not self._checkpoints.save_now(self._latest, HAND_BACK_SAVE_S):
            log.warning("the checkpoint at step %d was not stored: the next delivery starts from step %d",
                        self._latest.step, self._checkpoints.saved_step)  # fmt: skip

    def report(self, outcome: str) -> None:
        """One line per delivery: what it computed (a soak sums these against what each render needs)."""
        if self.steps is None:
            return  # denoising never began
        start = f"resumed from step {self.first}" if self.first else "from noise"
        saved = "" if self._checkpoints is None else f"; last checkpoint at step {self._checkpoints.saved_step}"
        log.info("denoising %s: %d steps computed in this delivery (steps %d to %d of %d, %s)%s", outcome,
                 self.last - self.first, self.first + 1, self.last, self.steps, start, saved)  # fmt: skip
