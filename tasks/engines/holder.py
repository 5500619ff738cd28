"""The one owner of this process's engine: loaded once, used many times, released once.

The worker process loads it (``tasks.worker.lifecycle``, in ``worker_process_init``) and releases
it at exit; the render uses it (``tasks.pipeline.s4_generate``). Touching it before it is loaded,
or after it is released, raises ``EngineNotReady``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from tasks.engines import choose_engine
from tasks.errors import EngineNotReady
from worker_config.settings import get_settings

if TYPE_CHECKING:
    from tasks.engines import Engine
    from worker_config.settings import Settings

__all__ = ["ENGINE", "EngineHolder", "load_engine"]

log = logging.getLogger("renderfarm.worker")


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


class EngineHolder:
    """Owns this process's engine: loaded once, used many times, released once."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self.loads = 0
        self.load_seconds: float | None = None

    @property
    def ready(self) -> bool:
        return self._engine is not None

    def load(self, settings: Settings | None = None, name: str | None = None) -> Engine:
        settings = settings or get_settings()
        started = time.perf_counter()
        self._engine = load_engine(settings, name)
        self.load_seconds = time.perf_counter() - started
        self.loads += 1
        log.info(
            "engine loaded: engine=%s model=%s device=%s in %.2fs (pid %d, load #%d)",
            self._engine.name, self._engine.model_id, self._engine.device, self.load_seconds, os.getpid(), self.loads,
        )  # fmt: skip
        return self._engine

    def get(self) -> Engine:
        if self._engine is None:
            raise EngineNotReady(
                f"no engine is loaded in process {os.getpid()}: it loads in worker_process_init, "
                "so this code is running outside a worker pool process or after shutdown"
            )
        return self._engine

    def release(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
            log.info("engine released (pid %d)", os.getpid())


ENGINE = EngineHolder()
