"""One chaos soak: a farm, a stream of renders, faults for a set time, a drain, the evidence, the check.

``soak(...)`` runs it and returns the checker's report (``bench.chaos_check``) with the faults,
the settings and, for some renders that resumed from a checkpoint, whether an uninterrupted render
of the same request gives the same bytes (rendered again with ``force`` once the faults are over).

The phases: the farm starts (``bench.chaos_farm``); the producer streams renders
(``bench.chaos_load``); the faults are injected as planned (``bench.chaos_faults``) until
``duration_s``; the producer stops sending; once every worker slot runs a ready worker again, the
last fault counts as healed and the requests have ``stuck_after_s`` to reach a final state; then
the evidence is gathered while the farm still runs, and the farm is stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.chaos_check import check, parse_log, summary
from bench.chaos_farm import BUCKET, Farm
from bench.chaos_faults import inject, plan
from bench.chaos_load import Load, read_states
from renderfarm.localstack import wait_for

__all__ = ["soak"]


def soak(
    workdir: Path, label: str, checkpoint_every_s: float, duration_s: float, seed: int, mean_gap_s: float = 20.0,
    stuck_after_s: float = 180.0, verify: int = 5, workers: int = 3, model_cache: Path | None = None,
    say: Any = print,
) -> dict[str, Any]:  # fmt: skip
    from tasks.engines.tiny_wan import ensure_tiny_wan

    cache = model_cache or workdir / "models"
    ensure_tiny_wan(cache)
    farm = Farm(workdir / label, cache, checkpoint_every_s, workers)
    load: Load | None = None
    try:
        started = time.time()
        farm.start()
        say(f"[{label}] {len(farm.slots)} workers ready in {time.time() - started:.0f} s; soak of {duration_s:.0f} s")
        load = Load(farm.redis.url, label, seed, outstanding=len(farm.slots) + 2)
        load.start()
        t0, targets, faults = time.time(), random.Random(seed + 1), []
        for planned in plan(seed, duration_s, mean_gap_s):
            time.sleep(max(0.0, t0 + planned.at_s - time.time()))
            fault = inject(farm, planned, targets)
            faults.append(fault)
            say(f"[{label}] {fault.t - t0:6.1f} s {fault.kind:<15} {fault.target or '':<14} "
                f"{'mid-denoising' if fault.mid_denoising else ''} {fault.note}".rstrip())  # fmt: skip
        time.sleep(max(0.0, t0 + duration_s - time.time()))
        load.stop_sending()
        wait_for(lambda: all(i.ready for i in farm.current.values()), 300, "every worker slot to run a ready worker")
        healed = time.time()
        load.wait_final(healed + stuck_after_s)
        drained = time.time()
        evidence = _gather(farm, load, [f.as_dict() for f in faults])
        (workdir / label / "evidence.json").write_text(json.dumps(evidence, default=str))
        verified = _verify(farm, load, evidence, verify)
    finally:
        if load is not None:
            load.close()
        farm.stop()
    report = check(evidence)
    report.update(
        label=label, checkpoint_every_s=checkpoint_every_s, duration_s=duration_s, seed=seed, workers=len(farm.slots),
        stuck_after_s=stuck_after_s, drain_s=round(drained - healed, 1), verified=verified,
        checkpoints_left=evidence["checkpoints_left"],
        incarnations=[i.as_dict() for i in farm.incarnations],
    )  # fmt: skip
    (workdir / label / "report.json").write_text(json.dumps(report, indent=1, default=str))
    say(f"[{label}] {summary(report)}")
    return report


def _gather(farm: Farm, load: Load, faults: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the checker reads, taken while the farm still runs."""
    from tasks.keys import object_key, resolve
    from tasks.schemas import Limits, RenderRequest

    limits = Limits(max_prompt_chars=2000, max_pixel_frames=10**9, models=("tiny-wan",))
    requests = {}
    for request in load.requests.values():
        spec = resolve(RenderRequest(**request.kwargs), "tiny-wan", request.id, limits)
        requests[request.id] = {**request.as_dict(), "key": object_key(spec)}
    client = farm.redis.client
    held = set()
    for name in ("render", *(f"render\x06\x16{step}" for step in (3, 6, 9))):
        held |= {_id_of(raw) for raw in client.lrange(name, 0, -1)}
    held |= {_id_of(raw, unacked=True) for raw in client.hvals("unacked")}
    s3 = _minio(farm)
    objects, left = {}, []
    for item in s3.list_objects(BUCKET, recursive=True):
        if item.object_name.endswith(".mp4"):
            response = s3.get_object(BUCKET, item.object_name)
            try:
                objects[item.object_name] = hashlib.sha256(response.read()).hexdigest()
            finally:
                response.close()
                response.release_conn()
        elif item.object_name.startswith("checkpoints/"):
            left.append(item.object_name)
    alive = [i for i in farm.current.values() if i.process.proc.poll() is None]
    return {
        "requests": requests,
        "metas": read_states(client, list(requests)),
        "held": sorted(held),
        "objects": objects,
        "checkpoints_left": len(left),
        "logs": {i.name: i.log_path.read_text(errors="replace") for i in farm.incarnations},
        "alive": [i.name for i in alive],
        "metrics": {i.name: _scrape(i.metrics) for i in alive},
        "faults": faults,
    }


def _id_of(raw: bytes | str, unacked: bool = False) -> str:
    message = json.loads(raw)
    return str((message[0] if unacked else message)["headers"]["id"])


def _minio(farm: Farm) -> Any:
    from minio import Minio

    return Minio(farm.s3.endpoint, access_key="chaos", secret_key="chaos-secret", secure=False, region="us-east-1")


def _scrape(address: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    steps = successes = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "renderfarm_denoising_steps_total":
                steps += sample.value
            elif sample.name == "renderfarm_renders_total" and sample.labels.get("outcome") in ("success", "cached"):
                successes += sample.value
    return {"steps": int(steps), "successes": int(successes)}


def _verify(farm: Farm, load: Load, evidence: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Some renders that completed after resuming from a checkpoint, rendered again uninterrupted:
    the same sha256 or not."""
    resumed = set()
    for name, text in evidence["logs"].items():
        resumed |= {d.task for d in parse_log(name, text)[0] if d.resumed_from > 0}
    chosen = sorted(t for t in resumed if (evidence["metas"].get(t) or {}).get("status") == "SUCCESS")[:count]
    out = []
    for task_id in chosen:
        request = load.requests[task_id]
        again = load.app.send_task("tasks.render", kwargs={**request.kwargs, "force": True}, queue="render",
                                   task_id=f"verify-{task_id}").get(timeout=300)  # fmt: skip
        first = evidence["metas"][task_id]["result"]["sha256"]
        out.append({"task": task_id, "sha256": first, "uninterrupted_sha256": again["sha256"],
                    "same": first == again["sha256"]})  # fmt: skip
    return out
