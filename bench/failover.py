"""What a Redis Sentinel failover loses, measured: ``python -m bench.failover`` (issue 16).

A master, a replica and three sentinels on loopback (renderfarm/localsentinel.py), one real worker
and a producer configured from ``REDIS_URL=sentinel://...``. Each trial publishes a burst of tiny
renders from a thread as fast as the producer can and kills the master (SIGKILL) while it publishes,
half-way through the burst; the producer retries a publish that raised (same task id), the sentinels promote the replica, and the
killed server rejoins as a replica for the next trial. Then every request the broker accepted is
awaited; one whose result does not come within ``--wait-s`` counts as lost and is sent again with
the same task id, which is what a producer does to close the gap (docs/reliability.md#sentinel).

Per trial: seconds from the kill until the sentinels name a new master; publishes refused during
the failover (the producer knew and retried); messages lost after the broker accepted them;
results lost (the render was stored, its result was not: served from storage when sent again).
Figures are printed and written to docs/reliability.md between its ``failover`` markers.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout

from bench.stack import local_stack, machine, replace_section
from renderfarm.localsentinel import SentinelCluster
from worker_config.celery_config import app_config
from worker_config.settings import BrokerSettings

ROOT = Path(__file__).resolve().parent.parent
TINY = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 1}


def publish(producer: Celery, request: dict[str, Any], task_id: str) -> int:
    """Send until the broker accepts it; how many attempts raised first."""
    refused = 0
    while True:
        try:
            producer.send_task("tasks.render", kwargs=request, queue="render", task_id=task_id)
            return refused
        except Exception:  # noqa: BLE001 - Redis away during the failover: the producer tries again
            refused += 1
            time.sleep(0.2)


def trial(cluster: SentinelCluster, producer: Celery, number: int, burst: int, wait_s: float) -> dict[str, float]:
    requests = {
        f"failover-{number}-{i}": {"prompt": f"failover trial {number}", "seed": i, **TINY} for i in range(burst)
    }
    sent, refused = [0], [0]

    def burst_out() -> None:  # the producer keeps publishing while the master dies
        for task_id, request in requests.items():
            refused[0] += publish(producer, request, task_id)
            sent[0] += 1

    publisher = threading.Thread(target=burst_out)
    publisher.start()
    while sent[0] < burst // 2:
        time.sleep(0.0005)
    old, killed_at = cluster.kill_master(), time.monotonic()
    publisher.join()
    new = cluster.wait_for_failover(old)
    failover_s = time.monotonic() - killed_at
    lost_messages = lost_results = 0
    for task_id, request in requests.items():
        try:
            producer.AsyncResult(task_id).get(timeout=wait_s)
        except ResultTimeout:
            publish(producer, request, task_id)
            again = producer.AsyncResult(task_id).get(timeout=120)
            if again["cached"]:
                lost_results += 1
            else:
                lost_messages += 1
    cluster.rejoin(old)
    print(f"trial {number}: master {old} -> {new} in {failover_s:.1f} s; {refused[0]} publishes refused, "
          f"{lost_messages} messages and {lost_results} results lost of {burst}", flush=True)  # fmt: skip
    return {
        "failover_s": failover_s,
        "refused": refused[0],
        "lost_messages": lost_messages,
        "lost_results": lost_results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--wait-s", type=float, default=60.0)
    args = parser.parse_args()

    with local_stack() as stack:
        from tasks.engines.tiny_wan import ensure_tiny_wan

        cache = stack.workdir / "models"
        ensure_tiny_wan(cache)
        cluster = SentinelCluster(
            stack.workdir / "sentinel", password="bench-master", sentinel_password="bench-sentinel"
        )
        try:
            stack.worker("failover", MODEL_CACHE_DIR=str(cache), **cluster.env)
            producer = Celery("bench")
            producer.conf.update(app_config(BrokerSettings(**cluster.env)))
            rows = [trial(cluster, producer, n, args.burst, args.wait_s) for n in range(1, args.trials + 1)]
            producer.close()
        finally:
            stack.stop()
            cluster.stop()

    m = machine()
    total = args.trials * args.burst
    sums = {k: sum(r[k] for r in rows) for k in ("refused", "lost_messages", "lost_results")}
    times = sorted(r["failover_s"] for r in rows)
    body = (
        f"Measured {time.strftime('%Y-%m-%d')} on {m['cpu']} ({m['cores']} cores), redis-server "
        f"{m['redis_server']}, celery {m['celery']}: {args.trials} failovers, each with a burst of "
        f"{args.burst} renders published as fast as one producer can and the master killed mid-burst "
        f"(`python -m bench.failover`; sentinels with `down-after-milliseconds 1000`).\n\n"
        "| | figure |\n|---|---|\n"
        f"| kill to new master named by all sentinels | {times[0]:.1f} to {times[-1]:.1f} s "
        f"(median {times[len(times) // 2]:.1f} s) |\n"
        f"| publishes refused during the failover (the producer saw an error and retried) | {sums['refused']} |\n"
        f"| messages lost after the broker accepted them | {sums['lost_messages']} of {total} |\n"
        f"| results lost (video stored, result gone; served from storage when sent again) | "
        f"{sums['lost_results']} of {total} |\n"
    )
    print(body)
    replace_section(ROOT / "docs" / "reliability.md", "failover", body)


if __name__ == "__main__":
    main()
