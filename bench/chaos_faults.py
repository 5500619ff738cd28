"""The chaos soak's faults: a schedule drawn from a seed, and how each fault is made and healed.

Six kinds, one at a time, each healed before the next is due:

- ``pool_kill``: SIGKILL of a worker's pool process (an OOM kill, a crash); Celery starts a new one.
- ``worker_kill``: SIGKILL of a whole worker (a node lost); the orchestrator starts another.
- ``worker_term``: SIGTERM of a worker (eviction, ``docker stop``); it should exit within the 30 s
  grace period (SIGKILL after it, as Kubernetes would); the orchestrator starts another.
- ``redis_restart``: Redis killed (SIGKILL) and started again after a few seconds.
- ``storage_outage``: the storage's port refuses connections for a few seconds, then comes back.
- ``network_cut``: the namespaced worker's link down for 3 to 15 s (the visibility timeout is 6 s:
  some cuts hand its render over, some do not), then up.

The schedule (the order of kinds, the gaps between faults and each outage's length) is drawn
from the seed, so it is the same on every run; kinds come in shuffled rounds of six, so every
kind occurs once before any occurs twice. Which worker a fault hits is chosen when it is due,
among the workers that are denoising then (so faults land mid-render), from a second seeded
generator; the render it hits depends on timing and is not reproducible.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.chaos_farm import Farm
from bench.chaos_probe import PREFIX

__all__ = ["KINDS", "Fault", "Planned", "plan", "inject", "denoising_now"]

KINDS = ("pool_kill", "worker_kill", "worker_term", "redis_restart", "storage_outage", "network_cut")
OUTAGE_S = {"redis_restart": (2.0, 6.0), "storage_outage": (2.0, 8.0), "network_cut": (3.0, 15.0)}
GRACE_S = 30.0  # the shortest grace period a platform gives after SIGTERM (docs/deploy.md)
AIM_S = 15.0  # how long a worker fault waits for a worker to be denoising before it hits an idle one


@dataclass(frozen=True)
class Planned:
    at_s: float  # seconds after the soak's start
    kind: str
    outage_s: float  # how long the outage lasts (0 for the process faults)


@dataclass
class Fault:
    kind: str
    planned_s: float
    t: float  # when it was injected (wall clock)
    healed: float  # when the fault was undone (Redis answers, storage listens, link up; the signal sent)
    slot: str | None = None
    target: str | None = None  # the worker it hit
    mid_denoising: bool = False  # the target was denoising when it was hit
    pid: int | None = None  # pool_kill: the pool process killed
    exit_s: float | None = None  # worker_term: seconds from SIGTERM to the worker's exit
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(seed: int, duration_s: float, mean_gap_s: float) -> list[Planned]:
    """The faults of a soak of ``duration_s`` seconds: the same for the same seed."""
    rng = random.Random(seed)
    faults: list[Planned] = []
    at, bag = 0.0, list[str]()
    while True:
        if not bag:
            bag = list(KINDS)
            rng.shuffle(bag)
        kind = bag.pop()
        low, high = OUTAGE_S.get(kind, (0.0, 0.0))
        outage = round(rng.uniform(low, high), 1)
        at += rng.uniform(0.5, 1.5) * mean_gap_s
        if at + outage > duration_s:
            return faults
        faults.append(Planned(round(at, 1), kind, outage))
        at += outage


def denoising_now(log_path: Path, within_s: float = 1.5) -> bool:
    """Did this worker report a denoising step in the last ``within_s`` (and not its last one)?"""
    try:
        with open(log_path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 16384))
            tail = log.read().decode(errors="replace")
    except OSError:
        return False
    for line in reversed(tail.splitlines()):
        at = line.find(PREFIX)
        if at < 0:
            continue
        with contextlib.suppress(ValueError):
            event = json.loads(line[at + len(PREFIX) :])
            return bool(event["e"] == "step" and event["step"] < event["steps"] and time.time() - event["t"] < within_s)
    return False


def _aim(farm: Farm, slots: list[str], rng: random.Random) -> tuple[str, bool]:
    """A slot whose worker is denoising now (waiting up to ``AIM_S``), else any of ``slots``."""
    deadline = time.monotonic() + AIM_S
    while time.monotonic() < deadline:
        busy = [s for s in slots if farm.current[s].ready and denoising_now(farm.current[s].log_path)]
        if busy:
            return rng.choice(busy), True
        time.sleep(0.1)
    return rng.choice(slots), False


def inject(farm: Farm, planned: Planned, rng: random.Random) -> Fault:
    """Make the fault, wait out its outage, heal it; what happened."""
    kind = planned.kind
    if kind in ("pool_kill", "worker_kill", "worker_term", "network_cut"):
        slot, mid = _aim(farm, ["net"] if kind == "network_cut" else farm.slots, rng)
        incarnation = farm.current[slot]
        fault = Fault(kind, planned.at_s, time.time(), 0.0, slot, incarnation.name, mid)
        pid = incarnation.process.proc.pid
        if kind == "pool_kill":
            child = farm.pool_pid(slot)
            if child is None:
                fault.note = "no pool process to kill"
            else:
                fault.pid = child
                os.kill(child, signal.SIGKILL)
        elif kind == "worker_kill":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        elif kind == "worker_term":
            incarnation.process.proc.send_signal(signal.SIGTERM)
            fault.exit_s = _exit_within(incarnation.process.proc, GRACE_S)
            if fault.exit_s is None:
                fault.note = f"still running {GRACE_S:.0f} s after SIGTERM: SIGKILLed"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        else:
            farm.network.cut()
            time.sleep(planned.outage_s)
            farm.network.heal()
        fault.healed = time.time()
        return fault
    busy = any(farm.current[s].ready and denoising_now(farm.current[s].log_path) for s in farm.slots)
    fault = Fault(kind, planned.at_s, time.time(), 0.0, mid_denoising=busy)
    if kind == "redis_restart":
        farm.redis.kill()
        time.sleep(planned.outage_s)
        farm.redis.start()
    elif kind == "storage_outage":
        farm.storage.stop()
        time.sleep(planned.outage_s)
        farm.storage.start()
    else:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(KINDS)}")
    fault.healed = time.time()
    return fault


def _exit_within(proc: Any, timeout_s: float) -> float | None:
    started = time.monotonic()
    try:
        proc.wait(timeout_s)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: it did not exit in time
        return None
    return round(time.monotonic() - started, 2)
