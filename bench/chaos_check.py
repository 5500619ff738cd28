"""The chaos soak's checker: every request's history, from evidence that does not take the farm's word.

Inputs (``evidence``, gathered by ``bench.chaos_soak`` once the soak has drained): the producer's
requests (ids, arguments, when Redis took them); the result backend's final state of each, read
from its keys; the ids still held in Redis (the queue's lists and kombu's unacked hash); every
object in the bucket with the sha256 of its bytes; every worker's log; the faults; the metrics
each surviving worker serves.

From the logs, the probe's lines (``bench.chaos_probe``) give every **delivery**: which worker and
pool process ran which task, when it started, each denoising step the engine reported (with its
time), and how it ended (no end: its process was killed). The farm's own per-delivery line
(``denoising <outcome>: N steps computed in this delivery``), its ``Task ... succeeded`` line and
its "already succeeded ... dropped" line are matched to the same delivery and checked against it.

Definitions:

- **completed**: the result backend says ``SUCCESS``, its key is the key the request maps to,
  and the bucket holds that object with the sha256 the result names.
- **completed more than once**: two or more deliveries of the request ended ``SUCCESS`` (the probe's
  ``task_postrun``), or the farm logged ``Task ... succeeded`` for it more than once. A late copy
  the farm drops (a cut-off or paused worker's delivery that finished after another) ends
  ``IGNORED`` with the farm's "already succeeded" line; it may upload the same object again (same
  key, same bytes: the bucket's sha256 check catches any other bytes) and costs only its steps.
- **failed**: a final ``FAILURE`` or ``REVOKED`` (with its exception type): a decision, not a loss.
- **stuck**: no final state ``stuck_after_s`` after the last fault was healed (every worker
  slot running again), while Redis or a worker still holds the task.
- **lost**: no final state then, and nothing holds it (not queued, not unacknowledged, not
  running): it will never complete. A ``SUCCESS`` whose object is missing or has other bytes
  counts as lost too (``broken``).
- **steps**: computed = the denoising steps the engine reported in every delivery; needed = the
  steps of the completed renders.
- **recovery** of a fault: the renders in a delivery on the worker it hit (every worker, for
  Redis and storage) at that moment, not completed already; for each, seconds from the fault to
  its next denoising step ("denoising again") and to its completion. For the faults that end the
  delivery (``pool_kill``, ``worker_kill``, ``worker_term``) the next step is one of a delivery
  that began after the fault; for the others (Redis, storage, the network) any delivery's: a render
  that was not stopped goes on at once, and its cost shows in the time to completion.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from bench.chaos_probe import PREFIX

__all__ = ["Delivery", "parse_log", "check", "summary"]

_TAGGED = re.compile(r"\] \[(?P<task>[^\]\s]+)\] (?P<logger>[\w.]+): (?P<msg>.*)")
_DENOISED = re.compile(r"denoising (?P<outcome>.+?): (?P<n>\d+) steps computed in this delivery")
_SUCCEEDED = re.compile(r"Task tasks\.render\[(?P<task>[^\]]+)\] succeeded")
_KILLING = ("pool_kill", "worker_kill", "worker_term")


@dataclass
class Delivery:
    incarnation: str
    task: str
    pid: int
    start: float
    steps: list[tuple[int, float]] = field(default_factory=list)
    end: float | None = None
    state: str | None = None
    farm_steps: int | None = None  # the farm's own per-delivery count, where it wrote one
    dropped: bool = False  # the farm's "already succeeded ... dropped" line
    uncheckpointed: bool = False  # the engine's "no checkpoints for this render" warning

    @property
    def computed(self) -> int:
        return len(self.steps)

    @property
    def resumed_from(self) -> int:
        return self.steps[0][0] - 1 if self.steps else 0

    @property
    def last_seen(self) -> float:
        return self.end or (self.steps[-1][1] if self.steps else self.start)


def parse_log(incarnation: str, text: str) -> tuple[list[Delivery], Counter[str]]:
    """The deliveries in one worker's log, and how often it logged each task as succeeded."""
    deliveries: list[Delivery] = []
    open_by_pid: dict[int, Delivery] = {}
    succeeded: Counter[str] = Counter()
    for line in text.splitlines():
        at = line.find(PREFIX)
        if at >= 0:
            try:
                event = json.loads(line[at + len(PREFIX) :])
            except ValueError:
                continue  # a line cut short by a kill
            pid, task = event["pid"], event["task"]
            if event["e"] == "start":
                open_by_pid[pid] = Delivery(incarnation, task, pid, event["t"])
                deliveries.append(open_by_pid[pid])
            elif (current := open_by_pid.get(pid)) is not None and current.task == task:
                if event["e"] == "step":
                    current.steps.append((event["step"], event["t"]))
                elif event["e"] == "end":
                    current.end, current.state = event["t"], event["state"]
                    del open_by_pid[pid]
            continue
        if (done := _SUCCEEDED.search(line)) is not None:
            succeeded[done["task"]] += 1
        if (tagged := _TAGGED.search(line)) is None:
            continue
        owner = next((d for d in reversed(deliveries) if d.task == tagged["task"] and d.end is None), None)
        if owner is None:
            continue
        if tagged["msg"].startswith("no checkpoints for this render"):
            owner.uncheckpointed = True
        elif tagged["logger"] != "tasks.render":
            continue
        elif (counted := _DENOISED.match(tagged["msg"])) is not None:
            owner.farm_steps = int(counted["n"])
        elif "already succeeded on" in tagged["msg"] and "this copy is dropped" in tagged["msg"]:
            owner.dropped = True
    return deliveries, succeeded


def _died(delivery: Delivery, faults: list[dict[str, Any]]) -> float | None:
    """When a delivery without an end was killed: the first fault after its start that killed its process."""
    for fault in faults:
        if fault["kind"] in _KILLING and fault["target"] == delivery.incarnation and fault["t"] >= delivery.start:
            if fault["kind"] != "pool_kill" or fault.get("pid") == delivery.pid:
                return float(fault["t"])
    return None


def _spread(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median": None, "max": None}
    return {"n": len(values), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def check(evidence: dict[str, Any]) -> dict[str, Any]:
    """Counts, steps and recovery times of one soak (see the module's docstring for each definition)."""
    requests: dict[str, dict[str, Any]] = evidence["requests"]
    faults: list[dict[str, Any]] = [dict(f) for f in evidence["faults"]]
    deliveries: list[Delivery] = []
    succeeded: Counter[str] = Counter()
    for name, text in evidence["logs"].items():
        found, lines = parse_log(name, text)
        deliveries += [d for d in found if d.task in requests]
        succeeded.update(lines)
    by_task: dict[str, list[Delivery]] = defaultdict(list)
    for delivery in deliveries:
        by_task[delivery.task].append(delivery)

    outcome: dict[str, str] = {}
    failed: Counter[str] = Counter()
    for task_id, request in requests.items():
        meta = evidence["metas"].get(task_id) or {}
        status = meta.get("status")
        if status == "SUCCESS":
            result = meta.get("result") or {}
            stored = evidence["objects"].get(request["key"])
            good = result.get("key") == request["key"] and stored is not None and stored == result.get("sha256")
            outcome[task_id] = "completed" if good else "broken"
        elif status in ("FAILURE", "REVOKED"):
            outcome[task_id] = "failed"
            failed[(meta.get("result") or {}).get("exc_type", status)] += 1
        else:
            running = any(d.end is None and _died(d, faults) is None and d.incarnation in evidence["alive"]
                          for d in by_task[task_id])  # fmt: skip
            outcome[task_id] = "stuck" if task_id in evidence["held"] or running else "lost"
    twice = sorted(t for t in requests if sum(d.state == "SUCCESS" for d in by_task[t]) > 1 or succeeded[t] > 1)
    completed = [t for t, o in outcome.items() if o == "completed"]
    steps_of = {t: int(r["kwargs"]["num_inference_steps"]) for t, r in requests.items()}

    done_at = {t: min(ends) for t in requests
               if (ends := [d.end for d in by_task[t] if d.state == "SUCCESS" and d.end is not None])}  # fmt: skip
    recovery: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"denoising": [], "completed": []})
    for fault in faults:
        hit = fault["target"] if fault["kind"] not in ("redis_restart", "storage_outage") else None
        t = fault["t"]
        affected = sorted({  # a late copy of a render completed already is not a render interrupted
            d.task for d in deliveries
            if (hit is None or d.incarnation == hit) and d.start <= t <= (d.end or _died(d, faults) or float("inf"))
            and done_at.get(d.task, float("inf")) > t
        })  # fmt: skip
        fault["affected"] = affected
        for task_id in affected:  # a fault that ends deliveries: the next one's steps; otherwise any
            later = [when for d in by_task[task_id] for _, when in d.steps
                     if when > t and (fault["kind"] not in _KILLING or d.start > t)]  # fmt: skip
            done = [d.end for d in by_task[task_id] if d.state == "SUCCESS" and d.end is not None and d.end > t]
            if later:
                recovery[fault["kind"]]["denoising"].append(min(later) - t)
            if done:
                recovery[fault["kind"]]["completed"].append(min(done) - t)

    computed_completed = sum(d.computed for t in completed for d in by_task[t])
    farm_disagrees = [d for d in deliveries if d.farm_steps is not None and d.farm_steps != d.computed]
    metrics_disagree = []
    for name, scraped in evidence["metrics"].items():
        mine = [d for d in deliveries if d.incarnation == name]
        probe = {"steps": sum(d.computed for d in mine), "successes": sum(d.state == "SUCCESS" for d in mine)}
        if scraped != probe:
            metrics_disagree.append({"worker": name, "metrics": scraped, "probe": probe})
    exits = [f["exit_s"] for f in faults if f["kind"] == "worker_term" and f.get("exit_s") is not None]
    return {
        "requests": len(requests),
        "completed": len(completed),
        "completed_more_than_once": len(twice),
        "completed_more_than_once_ids": twice,
        "late_copies_dropped": sum(d.dropped for d in deliveries),
        "failed": sum(failed.values()),
        "failed_by_reason": dict(failed),
        "lost": sum(o in ("lost", "broken") for o in outcome.values()),
        "lost_ids": sorted(t for t, o in outcome.items() if o in ("lost", "broken")),
        "broken_ids": sorted(t for t, o in outcome.items() if o == "broken"),
        "stuck": sum(o == "stuck" for o in outcome.values()),
        "stuck_ids": sorted(t for t, o in outcome.items() if o == "stuck"),
        "deliveries": len(deliveries),
        "hand_backs": sum(d.state == "REJECTED" for d in deliveries),
        "resumes": sum(d.resumed_from > 0 for d in deliveries),
        "resumes_saving_nothing": sum(d.resumed_from > 0 and d.uncheckpointed for d in deliveries),
        "steps_resumes_saved": sum(d.resumed_from for d in deliveries),
        "steps_needed": sum(steps_of[t] for t in completed),
        "steps_computed_for_completed": computed_completed,
        "steps_computed_all": sum(d.computed for d in deliveries),
        "steps_after_completed": sum(
            when > done_at.get(d.task, float("inf")) for d in deliveries for _, when in d.steps
        ),
        "publishes_refused": sum(r["publish_errors"] for r in requests.values()),
        "farm_step_lines_disagreeing": len(farm_disagrees),
        "metrics_disagreeing": metrics_disagree,
        "faults": faults,  # each with the renders it affected
        "faults_by_kind": dict(Counter(f["kind"] for f in faults)),
        "faults_mid_denoising": sum(bool(f.get("mid_denoising")) for f in faults),
        "recovery_s": {kind: {k: _spread(v) for k, v in r.items()} for kind, r in sorted(recovery.items())},
        "sigterm_exit_s": _spread(exits),
        "sigterm_past_grace": sum(1 for f in faults if f["kind"] == "worker_term" and f.get("exit_s") is None),
    }


def summary(report: dict[str, Any]) -> str:
    """One line: the counts a reader looks at first."""
    return (f"{report['requests']} requests: {report['completed']} completed, {report['completed_more_than_once']} "
            f"more than once, {report['failed']} failed, {report['lost']} lost, {report['stuck']} stuck; steps "
            f"{report['steps_computed_all']} computed for {report['steps_needed']} needed")  # fmt: skip
