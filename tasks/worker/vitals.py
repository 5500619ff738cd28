"""What the worker tells the local probes without Redis: it is alive, and its model is loaded.

Liveness and start-up probes (``python -m tasks.worker.healthcheck --probe live|startup``) must not
depend on Redis: a Redis outage would otherwise restart, or on Salad reallocate, every node of the
fleet at once. So the worker leaves two kinds of files in ``HEALTH_DIR/<node name>/``, read by the
probes on the same host:

- ``alive.json``, rewritten every ``HEARTBEAT_S`` by a thread of the worker's main process (its pid
  and the time): it goes stale when that process is gone, frozen or stuck holding the interpreter.
- ``loaded-<pid>``, written by a pool process once its engine is loaded (after ``worker_process_init``
  in ``tasks.worker.lifecycle``; a process whose load fails stops the worker instead).

Readiness (``--probe ready``, the default) is the Celery control check that needs Redis.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from celery import signals

from worker_config.settings import get_settings

__all__ = ["HEARTBEAT_S", "STALE_S", "alive", "install", "node_dir", "started"]

log = logging.getLogger("renderfarm.vitals")
HEARTBEAT_S = 10.0
STALE_S = 60.0  # the liveness probe's limit: six heartbeats missed
_NODE_ENV = "RENDERFARM_NODE"  # the node name, handed from the main process to its pool processes
_ALIVE = "alive.json"
_LOADED = "loaded-"  # + the pool process's pid


def node_dir(health_dir: Path, node: str) -> Path:
    return health_dir / node.replace("/", "_")


class Heartbeat(threading.Thread):
    def __init__(self, directory: Path) -> None:
        super().__init__(name="renderfarm-heartbeat", daemon=True)
        self._file = directory / _ALIVE
        self._stop_event = threading.Event()

    def beat(self) -> None:
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "time": time.time()}))
        tmp.replace(self._file)

    def run(self) -> None:
        while True:
            try:
                self.beat()
            except OSError as exc:  # a full or read-only disk: say so; the probe will too
                log.warning("could not write the liveness heartbeat %s: %s", self._file, exc)
            if self._stop_event.wait(HEARTBEAT_S):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self._file.unlink(missing_ok=True)


_HEARTBEAT: Heartbeat | None = None


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Main process, before the pool starts: a fresh directory for this node, and the heartbeat."""
    global _HEARTBEAT
    directory = node_dir(get_settings().HEALTH_DIR, sender.hostname)
    shutil.rmtree(directory, ignore_errors=True)  # markers of an earlier run of this node
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[_NODE_ENV] = sender.hostname
    _HEARTBEAT = Heartbeat(directory)
    _HEARTBEAT.beat()  # alive from the start: a model load may take many minutes
    _HEARTBEAT.start()


def _on_process_init(**_: Any) -> None:
    """A pool process whose engine loaded (connected after ``tasks.worker.lifecycle``'s load)."""
    node = os.environ.get(_NODE_ENV)
    if node is None:
        return
    marker = node_dir(get_settings().HEALTH_DIR, node) / f"{_LOADED}{os.getpid()}"
    try:
        marker.write_text(str(time.time()))
    except OSError as exc:
        log.warning("could not write the start-up marker %s: %s", marker, exc)


def _on_worker_shutdown(**_: Any) -> None:
    if _HEARTBEAT is not None:
        _HEARTBEAT.stop()


def alive(directory: Path, stale_s: float = STALE_S) -> tuple[bool, str]:
    """(alive?, why) from the heartbeat the worker's main process writes in ``directory``."""
    try:
        beat = json.loads((directory / _ALIVE).read_text())
    except (OSError, ValueError):
        return False, f"no heartbeat in {directory} (worker not started, or stopped)"
    age = time.time() - float(beat["time"])
    if not psutil.pid_exists(int(beat["pid"])):
        return False, f"the worker's main process (pid {beat['pid']}) is gone"
    if age > stale_s:
        return False, f"the worker's main process (pid {beat['pid']}) last beat {age:.0f}s ago (limit {stale_s:.0f}s)"
    return True, f"main process {beat['pid']} beat {age:.0f}s ago"


def started(directory: Path) -> tuple[bool, str]:
    """(started?, why): has a live pool process of the worker loaded its model?"""
    names = (p.name.removeprefix(_LOADED) for p in directory.glob(f"{_LOADED}*"))
    loaded = sorted(int(name) for name in names if name.isdigit())
    live = [pid for pid in loaded if psutil.pid_exists(pid)]
    if live:
        return True, f"pool process(es) {live} loaded the model"
    return False, "no pool process has loaded the model yet" + (f" (gone: {loaded})" if loaded else "")


def install(app: Any) -> None:
    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_process_init.connect(_on_process_init, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
