"""Throughput and overhead, side by side, on the same requests: ``make bench`` (or ``python -m bench.throughput``).

Systems compared at each render size (N renders each, submitted at once, wall time to the last;
the four run in turn, ``--rounds`` times, and each system's median round is reported, so a slow
minute of this shared machine does not land on one system only):
  direct  - the engine called in a plain loop in this process, then encode + upload (zero queue)
  queue   - this system, WORKER_MODE=queue, one real worker
  buffer  - this system, WORKER_MODE=buffer, one real worker
  naive   - a Celery worker that loads the model inside every task (bench/baseline_tasks.py)
Also: Celery's raw no-op round trip, the idle round-trip overhead of a render (end to end minus
the worker's own stage timings), cold start, cache-hit latency, and queue vs buffer with slow
uploads. Figures are printed and written to docs/benchmarks.md (+ a PNG plot).

torch runs on ``--threads`` CPU threads (default 1) in this process and in the workers: the
render gets one core, as a GPU would be a device of its own, and the other core runs what the
queue adds (Redis, Celery's main process, the producer, the S3 endpoint). With torch on every
core those compete with the render for the CPU, which a GPU worker does not have; ``--threads 2``
measures that case.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.stack import local_stack, machine, pct, replace_section

ROOT = Path(__file__).resolve().parent.parent
SIZES = [  # name, request, renders per system
    ("64x64x9, 4 steps", {"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 4}, 40),
    ("128x128x17, 6 steps", {"height": 128, "width": 128, "num_frames": 17, "num_inference_steps": 6}, 10),
    ("256x256x33, 4 steps", {"height": 256, "width": 256, "num_frames": 33, "num_inference_steps": 4}, 4),
]
SYSTEMS = ("direct", "queue", "buffer", "naive")
# Untimed renders before each timed batch of direct, queue and buffer (naive, which loads the
# model in every task, gets one). Two, because a fresh worker process's heap reaches its
# steady state on the second render of a size (tasks/worker/allocator.py, tasks/worker/memory.py: the first
# takes its memory from the kernel, the second still grows a little); direct's process is older.
WARMUP = 2
_seeds = itertools.count(1000)


def spec_for(request: dict[str, Any], seed: int) -> dict[str, Any]:
    return {"prompt": "benchmark", "negative_prompt": "", "guidance_scale": 5.0, "fps": 8, "model": "tiny-wan",
            "seed": seed, **request}  # fmt: skip


def run_direct(request: dict[str, Any], n: int) -> float:
    """The ideal: no queue. Same stages as the worker: render, encode, upload."""
    import tempfile

    from tasks.engines.diffusers_engine import DiffusersEngine
    from tasks.keys import object_key
    from tasks.pipeline.s5_encode import encode_mp4, sha256_file, to_uint8_frames
    from tasks.pipeline.storage import VideoStore
    from tasks.worker.allocator import keep_freed_memory
    from worker_config.settings import get_settings

    settings = get_settings()
    keep_freed_memory(settings.KEEP_FREED_MEMORY_MB)  # the allocator settings of every worker's pool process
    engine = DiffusersEngine(settings)
    store = VideoStore(settings)
    store.ensure_bucket()
    for _ in range(WARMUP):  # untimed, as for the queue and buffer workers
        engine.render(spec_for(request, next(_seeds)), lambda *a: None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(n):
            spec = spec_for(request, next(_seeds))
            frames = to_uint8_frames(engine.render(spec, lambda *a: None).frames)
            path = encode_mp4(frames, spec["fps"], Path(tmp) / "v.mp4")
            store.put(object_key(spec), path, {"sha256": sha256_file(path)})
    elapsed = time.perf_counter() - started
    engine.close()
    return elapsed


def run_queue(request: dict[str, Any], n: int) -> tuple[float, list[dict[str, Any]]]:
    from tasks import render

    for _ in range(WARMUP):  # untimed
        render.delay(prompt="warm-up", seed=next(_seeds), **request).get(timeout=1800)
    started = time.perf_counter()
    sent = [render.delay(prompt="benchmark", seed=next(_seeds), **request) for _ in range(n)]
    results = [r.get(timeout=1800) for r in sent]
    return time.perf_counter() - started, results


def run_naive(request: dict[str, Any], n: int) -> float:
    from bench.baseline_tasks import naive_render
    from tasks.keys import object_key

    warm = spec_for(request, next(_seeds))
    naive_render.delay(warm, "naive/" + object_key(warm)).get(timeout=1800)  # untimed
    started = time.perf_counter()
    specs = [spec_for(request, next(_seeds)) for _ in range(n)]
    sent = [naive_render.delay(spec, "naive/" + object_key(spec)) for spec in specs]
    for r in sent:
        r.get(timeout=1800)
    return time.perf_counter() - started


def round_trips(task: Any, n: int, **kwargs: Any) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        task.delay(**kwargs).get(timeout=60)
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer renders (a smoke run; figures are noisier)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four systems per size (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in the workers")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported, here and in every worker
    sizes = [(name, req, max(2, n // 4) if args.quick else n) for name, req, n in SIZES]
    report: dict[str, Any] = {
        "machine": machine(),
        "sizes": [],
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": args.threads,
        "rounds": args.rounds,
    }

    with local_stack() as stack:
        from tasks.engines.tiny_wan import ensure_tiny_wan
        from worker_config.settings import get_settings

        ensure_tiny_wan(get_settings().MODEL_CACHE_DIR)

        # Cold start: from `celery worker` start to the first render accepted (STARTED), a task waiting.
        from tasks import render

        waiting = render.delay(prompt="cold start", seed=1, height=64, width=64, num_frames=5, num_inference_steps=1)
        started = time.perf_counter()
        queue_worker = stack.worker("queue", wait=False, WORKER_MODE="queue")
        while waiting.state not in ("STARTED", "PROGRESS", "SUCCESS"):
            time.sleep(0.01)
        cold_start = time.perf_counter() - started
        waiting.get(timeout=120)
        queue_worker.wait_ready()
        print(f"cold start (worker start -> first render accepted): {cold_start:.2f}s")

        # Idle round-trip overhead of a render, and cache hits.
        tiny = {"height": 64, "width": 64, "num_frames": 5, "num_inference_steps": 1}
        overhead = []
        for _ in range(10 if args.quick else 30):
            t0 = time.perf_counter()
            result = render.delay(prompt="idle", seed=next(_seeds), **tiny).get(timeout=60)
            overhead.append(time.perf_counter() - t0 - result["timings"]["total"])
        hits = round_trips(render, 10 if args.quick else 30, prompt="idle", seed=1001, **tiny)[1:]  # first renders
        print(f"idle overhead p50 {pct(overhead, 50) * 1000:.1f} ms, p95 {pct(overhead, 95) * 1000:.1f} ms; "
              f"cache hit p50 {pct(hits, 50) * 1000:.1f} ms, p95 {pct(hits, 95) * 1000:.1f} ms")  # fmt: skip

        # Baselines: Celery's raw round trip; the naive worker.
        from bench.baseline_tasks import noop

        baseline = stack.worker("baseline", app="bench.baseline_tasks", queue="bench")
        noop_rt = round_trips(noop, 50 if args.quick else 200)
        print(f"celery no-op round trip p50 {pct(noop_rt, 50) * 1000:.1f} ms, p95 {pct(noop_rt, 95) * 1000:.1f} ms")

        for name, request, n in sizes:
            rounds: dict[str, list[float]] = {k: [] for k in SYSTEMS}
            for _ in range(args.rounds):
                rounds["direct"].append(run_direct(request, n))
                rounds["queue"].append(run_queue(request, n)[0])
                queue_worker.stop()
                buffer_worker = stack.worker("buffer", WORKER_MODE="buffer")
                rounds["buffer"].append(run_queue(request, n)[0])
                buffer_worker.stop()
                queue_worker = stack.worker("queue", WORKER_MODE="queue")
                rounds["naive"].append(run_naive(request, n))
                print(f"  {name} round: " + ", ".join(f"{k} {rounds[k][-1]:.2f}s" for k in SYSTEMS))
            row: dict[str, Any] = {"size": name, "n": n, "rounds": rounds}
            row.update({k: statistics.median(v) for k, v in rounds.items()})
            report["sizes"].append(row)
            print(f"{name} (median of {args.rounds}): " + ", ".join(f"{k} {row[k]:.2f}s ({n / row[k] * 60:.1f}/min)"
                                                                   for k in SYSTEMS))  # fmt: skip
        baseline.stop()

        # Slow uploads: queue vs buffer behind a throttled S3 endpoint (every PUT held 0.5 s).
        from renderfarm.localstack import SlowS3Proxy

        proxy = SlowS3Proxy(stack.s3.port, delay_s=0.5)
        slow_req, slow_n = (
            {"height": 128, "width": 128, "num_frames": 9, "num_inference_steps": 4},
            (4 if args.quick else 10),
        )
        slow: dict[str, float] = {}
        queue_worker.stop()
        for mode in ("queue", "buffer"):
            worker = stack.worker(f"slow-{mode}", WORKER_MODE=mode, MINIO_ENDPOINT=proxy.endpoint)
            slow[mode], _ = run_queue(slow_req, slow_n)
            worker.stop()
        proxy.stop()
        print(
            f"slow uploads (0.5 s per PUT), {slow_n} renders: queue {slow['queue']:.2f}s, buffer {slow['buffer']:.2f}s"
        )

    report.update(cold_start_s=cold_start, overhead_ms=[x * 1000 for x in overhead], cache_hit_ms=[x * 1000 for x in hits],
                  noop_ms=[x * 1000 for x in noop_rt], slow_uploads={"n": slow_n, **slow})  # fmt: skip
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "throughput.json").write_text(json.dumps(report, indent=2))
    if not args.no_write:
        write_docs(report)


def write_docs(report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = report["sizes"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for system in SYSTEMS:
        ax.plot([r["size"] for r in sizes], [r["n"] / r[system] * 60 for r in sizes], marker="o", label=system)
    ax.set_yscale("log")
    ax.set_ylabel("renders per minute (log)")
    ax.set_xlabel("render size (tiny-wan on CPU)")
    ax.set_title("Throughput against render size, one worker")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "benchmarks-throughput.png", dpi=110)

    m = report["machine"]
    lines = [
        f"Measured {report['when']} by `make bench` (`python -m bench.throughput`): {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, Celery {m['celery']}, "
        f"redis-server {m['redis_server']}, moto's S3 server on loopback. tiny-wan on the CPU; a shared, noisy machine. "
        f"torch on {report.get('threads', 'all')} thread(s) in every process; each figure is the median of "
        f"{report.get('rounds', 1)} rounds of the four systems in turn.",
        "",
        "| render size | N | direct | queue mode | buffer mode | naive worker | queue / direct | buffer / direct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sizes:
        per_min = {k: r["n"] / r[k] * 60 for k in SYSTEMS}
        lines.append(
            f"| {r['size']} | {r['n']} | {per_min['direct']:.1f}/min ({r['direct'] / r['n']:.2f} s each) | "
            f"{per_min['queue']:.1f}/min | {per_min['buffer']:.1f}/min | {per_min['naive']:.1f}/min | "
            f"{per_min['queue'] / per_min['direct']:.1%} | {per_min['buffer'] / per_min['direct']:.1%} |"
        )
    o, h, z, s = report["overhead_ms"], report["cache_hit_ms"], report["noop_ms"], report["slow_uploads"]
    lines += [
        "",
        "![throughput against render size](benchmarks-throughput.png)",
        "",
        "| figure | p50 | p95 |",
        "|---|---|---|",
        f"| idle round-trip overhead of a render (end to end minus the worker's stage timings) | {pct(o, 50):.1f} ms | {pct(o, 95):.1f} ms |",
        f"| cache hit, end to end (`render.delay(...).get()` of a stored video) | {pct(h, 50):.1f} ms | {pct(h, 95):.1f} ms |",
        f"| Celery's raw no-op round trip on the same Redis (the floor) | {pct(z, 50):.1f} ms | {pct(z, 95):.1f} ms |",
        "",
        f"Cold start (worker process start to the first render accepted, model load included): "
        f"{report['cold_start_s']:.2f} s.",
        "",
        f"Slow uploads (every PUT held 0.5 s by a proxy), {s['n']} renders of 128x128x9: queue mode {s['queue']:.2f} s, "
        f"buffer mode {s['buffer']:.2f} s ({s['queue'] / s['buffer']:.2f}x).",
    ]  # fmt: skip
    replace_section(ROOT / "docs" / "benchmarks.md", "throughput", "\n".join(lines))
    print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
