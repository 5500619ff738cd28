"""What one Redis pays for the farm, measured: ``python -m bench.redis_cost`` (issue 16, docs/scaling.md).

On a local stack (real redis-server, S3 endpoint, real workers with this project's configuration:
prefork pool, concurrency 1, task events on), it measures from Redis's own counters (``INFO
commandstats``, ``INFO stats``, ``INFO cpu``, ``used_memory``):
  - memory per queued request (requests sent with no worker running) and per stored result;
  - commands, bytes and Redis CPU per render (tiny renders, several workers at once);
  - commands and bytes per idle worker per second (heartbeats, sweeps, polling), beyond what an
    idle Redis costs itself (measured first, with no worker);
  - the render rate those workers reached (bounded by this machine's CPU, not by Redis).
Figures are printed and written to docs/scaling.md between its ``redis-cost`` markers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from celery import Celery

from bench.stack import local_stack, machine, replace_section
from worker_config.celery_config import app_config
from worker_config.settings import BrokerSettings

ROOT = Path(__file__).resolve().parent.parent
TINY = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 1}
PROMPT = "a red fox running through fresh snow at golden hour, cinematic, 35mm"  # 68 characters


def counters(client: Any) -> dict[str, float]:
    info = client.info("all")
    out = {"calls": 0.0, "bytes_in": float(info["total_net_input_bytes"]),
           "bytes_out": float(info["total_net_output_bytes"]),
           "cpu_s": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
           "memory": float(info["used_memory"])}  # fmt: skip
    for name, stats in info.items():
        if name.startswith("cmdstat_"):
            out[name.removeprefix("cmdstat_")] = float(stats["calls"])
            out["calls"] += float(stats["calls"])
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, default=120)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--queued", type=int, default=2000)
    parser.add_argument("--idle-s", type=float, default=30.0)
    args = parser.parse_args()

    with local_stack() as stack:
        client = stack.redis.client
        producer = Celery("bench")
        producer.conf.update(app_config(BrokerSettings(REDIS_URL=stack.redis.url)))

        # 1. Memory per queued request: nobody consumes yet.
        before = counters(client)
        queued = [producer.send_task("tasks.render", kwargs={"prompt": PROMPT, "seed": i, **TINY}, queue="render")
                  for i in range(args.queued)]  # fmt: skip
        per_queued = (counters(client)["memory"] - before["memory"]) / args.queued
        client.flushall()
        del queued

        # 2. Redis alone (its own housekeeping), then idle workers: what each costs per second beyond that.
        before = counters(client)
        time.sleep(args.idle_s)
        alone = {k: v / args.idle_s for k, v in delta(counters(client), before).items()}
        workers = [stack.worker(f"w{i}") for i in range(args.workers)]
        time.sleep(5)  # past start-up
        before = counters(client)
        time.sleep(args.idle_s)
        idle = delta(counters(client), before)
        idle_per_worker_s = {k: (v / args.idle_s - alone.get(k, 0.0)) / len(workers) for k, v in idle.items()}

        # 3. Renders: all sent at once, several workers.
        before = counters(client)
        started = time.perf_counter()
        results = [producer.send_task("tasks.render", kwargs={"prompt": PROMPT, "seed": 10_000 + i, **TINY},
                                      queue="render") for i in range(args.renders)]  # fmt: skip
        for result in results:
            result.get(timeout=600)
        wall = time.perf_counter() - started
        during = delta(counters(client), before)
        # What Redis and the idle workers would have cost anyway over that time is not the renders' cost.
        baseline = {k: (alone.get(k, 0.0) + idle_per_worker_s.get(k, 0.0) * len(workers)) * wall for k in during}
        per_render = {k: (during[k] - baseline[k]) / args.renders for k in during}
        keys = [f"celery-task-meta-{r.id}" for r in results]
        result_bytes = sum(int(client.memory_usage(key) or 0) for key in keys) / len(keys)
        producer.close()

    top = sorted(((v, k) for k, v in per_render.items() if k not in ("calls", "bytes_in", "bytes_out", "cpu_s",
                                                                       "memory") and v >= 0.5), reverse=True)  # fmt: skip
    info = machine()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {info.get('cpu', '?')} ({info.get('cores', '?')} cores), "
        f"redis-server {info['redis_server'].removeprefix('v=')}, celery {info['celery']}, "
        f"{args.workers} workers (prefork, concurrency 1, events on), {args.renders} renders of 32x32x5, 1 step "
        f"(`python -m bench.redis_cost`).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| Redis memory per queued request (68-character prompt) | {per_queued / 1024:.2f} KiB |",
        f"| Redis memory per stored result (kept `RESULT_EXPIRES_S`) | {result_bytes / 1024:.2f} KiB |",
        f"| Redis commands per render | {per_render['calls']:.0f} |",
        f"| bytes into / out of Redis per render | {per_render['bytes_in'] / 1024:.1f} KiB / "
        f"{per_render['bytes_out'] / 1024:.1f} KiB |",
        f"| Redis CPU per render | {per_render['cpu_s'] * 1000:.2f} ms |",
        f"| commands per idle worker per second | {idle_per_worker_s['calls']:.1f} |",
        f"| bytes into / out of Redis per idle worker per second | {idle_per_worker_s['bytes_in'] / 1024:.2f} KiB / "
        f"{idle_per_worker_s['bytes_out'] / 1024:.2f} KiB |",
        f"| Redis CPU per idle worker per second | {idle_per_worker_s['cpu_s'] * 1000:.2f} ms "
        f"(Redis alone, its own housekeeping: {alone['cpu_s'] * 1000:.2f} ms per second, not counted) |",
        f"| render rate reached (this machine's CPU is the limit) | {args.renders / wall * 60:.0f} renders/min |",
        "",
        "Commands per render, most frequent first: "
        + ", ".join(f"`{name}` {count:.1f}" for count, name in top[:14])
        + ".",
    ]
    body = "\n".join(lines)
    print(body)
    replace_section(ROOT / "docs" / "scaling.md", "redis-cost", body)


if __name__ == "__main__":
    main()
