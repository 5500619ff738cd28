"""Memory over a long run: ``make bench-memory`` (or ``python -m bench.memory``).

Renders N tiny-wan videos on one worker (no recycling) and records the pool process's resident
set after each render (and, with ENGINE=fastvideo, its spawned workers'). Prints the growth per
render after warm-up (least-squares slope) and writes a plot and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import psutil

from bench.stack import local_stack, machine, replace_section

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def tree_rss_mb(pid: int) -> tuple[float, float]:
    """(the process's RSS, the RSS of its descendants) in MiB."""
    proc = psutil.Process(pid)
    own = proc.memory_info().rss / 2**20
    children = sum(c.memory_info().rss for c in proc.children(recursive=True)) / 2**20
    return own, children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="renders (default 300)")
    parser.add_argument("--engine", default="diffusers", choices=["diffusers", "fastvideo"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    request = {"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 4}

    with local_stack() as stack:
        from tasks import render

        stack.worker("memory", ENGINE=args.engine, WORKER_MAX_TASKS_PER_CHILD="0")
        rows: list[dict[str, Any]] = []
        started = time.perf_counter()
        for i in range(args.n):
            result = render.delay(prompt=f"memory {i}", seed=i, **request).get(timeout=300)
            own, children = tree_rss_mb(result["worker_pid"])
            rows.append({"i": i + 1, "rss_mb": own, "children_rss_mb": children, "pid": result["worker_pid"]})
            if (i + 1) % 50 == 0:
                print(f"{i + 1} renders: pool process RSS {own:.1f} MiB (+{children:.1f} MiB in its children)")
        elapsed = time.perf_counter() - started

    assert len({r["pid"] for r in rows}) == 1, "the pool process was replaced during the run"
    report = {"machine": machine(), "engine": args.engine, "n": args.n, "elapsed_s": elapsed, "rows": rows,
              **summarize(rows)}  # fmt: skip
    print(f"{args.n} renders in {elapsed:.0f}s; {describe(report)}")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"memory-{args.engine}.json").write_text(json.dumps(report, indent=2))
    if not args.no_write:
        write_docs(report)


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Growth over all renders after warm-up, and over the second half (the steady state: the heap
    trim keeps the resident set in a band, so a step into that band early on reads as a slope over
    the whole run), with the band's bounds."""
    total = [r["rss_mb"] + r["children_rss_mb"] for r in rows]
    index = [float(r["i"]) for r in rows]
    half = WARMUP + (len(rows) - WARMUP) // 2
    return {
        "first_mb": total[WARMUP], "last_mb": total[-1],
        "growth_mib_per_render": slope(index[WARMUP:], total[WARMUP:]),
        "late_growth_mib_per_render": slope(index[half:], total[half:]),
        "late_from": half + 1, "late_min_mb": min(total[half:]), "late_max_mb": max(total[half:]),
    }  # fmt: skip


def describe(report: dict[str, Any]) -> str:
    kib = 1024
    # With FastVideo the render runs in the pool process's spawned worker: both are counted.
    what = "pool process resident set" + (" (with its spawned workers)" if report["engine"] != "diffusers" else "")
    return (
        f"{what} after {WARMUP} warm-up renders {report['first_mb']:.1f} MiB, after the last "
        f"{report['last_mb']:.1f} MiB; least-squares growth {report['growth_mib_per_render'] * kib:.1f} KiB per render "
        f"over renders {WARMUP + 1}-{report['n']}, {report['late_growth_mib_per_render'] * kib:.1f} KiB per render over "
        f"renders {report['late_from']}-{report['n']}, which stayed between {report['late_min_mb']:.1f} and "
        f"{report['late_max_mb']:.1f} MiB"
    )


def write_docs(report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, engine = report["rows"], report["engine"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["i"] for r in rows], [r["rss_mb"] + r["children_rss_mb"] for r in rows], lw=1)
    ax.axvline(WARMUP, color="grey", ls=":", lw=1)
    ax.set_xlabel("renders")
    ax.set_ylabel("pool process RSS (MiB)" if engine == "diffusers" else "pool process + workers RSS (MiB)")
    ax.set_title(f"Worker memory over {report['n']} renders ({engine}, tiny-wan, CPU)")
    fig.tight_layout()
    png = f"benchmarks-memory-{engine}.png"
    fig.savefig(ROOT / "docs" / png, dpi=110)
    body = (
        f"`make bench-memory` (`python -m bench.memory --engine {engine}`), {time.strftime('%Y-%m-%d', time.gmtime())}: "
        f"{report['n']} renders of 64x64x9 (4 steps) on one worker without recycling, in {report['elapsed_s']:.0f} s. "
        f"{describe(report)[0].upper()}{describe(report)[1:]}.\n\n"
        f"![worker memory over a long run]({png})"
    )
    replace_section(ROOT / "docs" / "benchmarks.md", f"memory-{engine}", body)
    print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
