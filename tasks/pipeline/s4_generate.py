"""Stage 4, ``encoding_prompt``, ``denoising``, ``decoding``: the engine renders the frames.

The engine loaded in this process (``tasks.engines.holder.ENGINE``) renders the spec and reports
each stage and step through a callback, which moves the task's progress (``StageClock``), asks
whether the render must stop (``RenderStop``: ``RenderCancelled`` stops it at that step, or before
that stage: decoding included) and, before the first denoising step, waits for the storage lookup
(``ServedFromStorage`` stops it there).
An out-of-memory gets one more try after memory is freed (``tasks.engines.oom``). The render's
peak memory is measured in this process around it (``tasks.engines.peak_memory``), unless the
engine measured it where the model runs (FastVideo's worker process: ``RenderOutput.stats``).
"""

from __future__ import annotations

from celery import Task

from tasks.engines import RenderOutput
from tasks.engines.holder import ENGINE
from tasks.engines.oom import with_one_oom_retry
from tasks.engines.peak_memory import PeakMemory
from tasks.images import ConditioningImage
from tasks.keys import RenderSpec
from tasks.pipeline.cancelling import RenderStop
from tasks.pipeline.progress import StageClock
from tasks.pipeline.s3_lookup import StorageLookup, serve_if_stored

__all__ = ["generate", "Memory"]

# The render's peak memory in MiB and where it was measured ("cuda" | "rss"), or (None, None).
Memory = tuple[float | None, str | None]


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

    def progress(stage: str, step: int | None, steps: int | None) -> None:
        nonlocal lookup
        stop.check(stage, step, steps)
        # Engines report denoising step 0 before their first step: storage must have answered by then.
        if lookup is not None and (stage == "denoising" or lookup.done()):
            answered, lookup = lookup, None
            serve_if_stored(answered, clock)
        clock.progress(stage, step, steps)

    peak = PeakMemory(engine.device)
    peak.start()
    output = with_one_oom_retry(lambda: engine.render(spec, progress, image), spec, engine.device)
    memory = peak.stop()
    if output.stats.get("peak_memory_mb") is not None:  # measured where the model runs (FastVideo's worker)
        memory = (output.stats["peak_memory_mb"], output.stats.get("memory_source"))
    serve_if_stored(lookup, clock)  # still unanswered only if the engine never reported a denoising step
    return output, engine.name, memory
