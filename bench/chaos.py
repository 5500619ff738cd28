"""The chaos soak (issue 27): ``python -m bench.chaos --duration 900 --seed 1 [--write-docs]``.

Two soaks of ``--duration`` seconds each on the same fault schedule (drawn from ``--seed``),
checkpoints on (``CHECKPOINT_EVERY_S=--checkpoint-every``) and off (0): a steady stream of
renders of mixed lengths on three tiny-wan workers (one behind a network namespace) while
workers' pool processes are SIGKILLed, workers SIGKILLed and SIGTERMed (and replaced), Redis
killed and restarted, storage stopped and started and the namespaced worker's link cut and healed.
A checker then reads every request's history (``bench.chaos_check``). One table compares the two;
the reports go to ``bench/results/chaos.json`` and, with ``--write-docs``, the table to
docs/reliability.md between its ``chaos`` markers (``--table-only`` rebuilds it from the JSON,
``--recheck DIR`` checks the evidence a soak left in its work directory again).
A benchmark, not a test: it prints figures (``tests/test_chaos.py`` runs a short soak and fails
on a lost, stuck or twice-completed render). Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.chaos_check import check
from bench.chaos_faults import KINDS
from bench.chaos_soak import soak
from bench.stack import machine, replace_section

__all__ = ["table", "main"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "chaos.json"
Report = dict[str, Any]


def _spread(spread: dict[str, Any]) -> str:
    """median / max (how many)"""
    return "-" if not spread["n"] else f"{spread['median']:.1f} / {spread['max']:.1f} ({spread['n']})"


def _fault_cell(r: Report, kind: str) -> str:
    faults = [f for f in r["faults"] if f["kind"] == kind]
    again = r["recovery_s"].get(kind, {"denoising": {"n": 0}, "completed": {"n": 0}})
    mid = sum(f["mid_denoising"] for f in faults)
    return f"{len(faults)} ({mid}); {_spread(again['denoising'])}; {_spread(again['completed'])}"


def _counts(r: Report, *keys: str) -> str:
    return " / ".join(str(r[key]) for key in keys)


def _steps(r: Report) -> str:
    extra = r["steps_computed_for_completed"] - r["steps_needed"]
    return f"{r['steps_computed_for_completed']} / {r['steps_needed']} (+{100 * extra / (r['steps_needed'] or 1):.1f}%)"


_ROWS: list[tuple[str, Callable[[Report], object]]] = [
    ("renders requested", lambda r: r["requests"]),
    ("completed", lambda r: r["completed"]),
    ("**completed more than once**", lambda r: r["completed_more_than_once"]),
    ("**lost**", lambda r: r["lost"]),
    ("**stuck** (not final {stuck:g} s after the last fault healed)", lambda r: r["stuck"]),
    ("failed (a final error)", lambda r: f"{r['failed']} {r['failed_by_reason'] or ''}".strip()),
    ("late copies dropped by the farm (harmless)", lambda r: r["late_copies_dropped"]),
    ("deliveries / handed back on SIGTERM / resumed", lambda r: _counts(r, "deliveries", "hand_backs", "resumes")),
    ("denoising steps computed / needed, completed renders", _steps),
    ("... of them after the render had completed elsewhere (late copies)", lambda r: r["steps_after_completed"]),
    ("steps a resume did not compute again", lambda r: r["steps_resumes_saved"]),
    ("resumed deliveries that could save no checkpoint (engine warning)", lambda r: r["resumes_saving_nothing"]),
    ("publishes refused while Redis was down (sent again)", lambda r: r["publishes_refused"]),
    ("checkpoints left in the bucket", lambda r: r["checkpoints_left"]),
]


def table(reports: list[Report]) -> str:
    """One markdown table, a column per soak."""
    names = [f"checkpoints every {r['checkpoint_every_s']:g} s" if r["checkpoint_every_s"] else "checkpoints off"
             for r in reports]  # fmt: skip
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(reports) + 1) + "|"]
    stuck = reports[0]["stuck_after_s"]
    lines += [f"| {title.format(stuck=stuck)} | " + " | ".join(str(cell(r)) for r in reports) + " |"
              for title, cell in _ROWS]  # fmt: skip
    for kind in KINDS:
        lines.append(f"| {kind}: faults (mid-denoising); s to denoising again; s to completed | " + " | ".join(
            _fault_cell(r, kind) for r in reports) + " |")  # fmt: skip
    lines.append("| SIGTERM to the worker's exit, s median / max | " + " | ".join(
        _spread(r["sigterm_exit_s"]) for r in reports) + " |")  # fmt: skip
    lines.append("| resumed renders rendered again uninterrupted: same bytes | " + " | ".join(
        f"{sum(v['same'] for v in r['verified'])} of {len(r['verified'])}" for r in reports) + " |")  # fmt: skip
    return "\n".join(lines)


def body(saved: dict[str, Any]) -> str:
    """The docs section: what ran, where, and the table."""
    m, args, reports = saved["machine"], saved["args"], saved["reports"]
    return (
        f"Measured {saved['date']} on {m['cpu']} ({m['cores']} cores, shared with other jobs running at the same "
        f"time), redis-server {m['redis_server']}, celery {m['celery']}, torch {m['torch']}: `make chaos DURATION="
        f"{args['duration']:.0f} SEED={args['seed']}`: {reports[0]['workers']} tiny-wan workers on the diffusers "
        f"engine (steps paced to at least 0.1 s; one worker behind a network namespace), `VISIBILITY_TIMEOUT_S=6`, "
        f"`LEASE_RENEW_S=2`, renders of 8, 20, 40 or 80 steps, {args['duration'] / 60:.0f} minutes of faults per "
        "column on the same schedule (the renders each fault hits depend on timing).\n\n" + table(reports) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=900.0, help="seconds of faults per soak (default 900)")
    parser.add_argument("--seed", type=int, default=1, help="the fault schedule's seed (default 1)")
    parser.add_argument("--checkpoint-every", type=float, default=1.0, help="CHECKPOINT_EVERY_S when on (default 1)")
    parser.add_argument("--mean-gap", type=float, default=20.0, help="mean seconds between faults (default 20)")
    parser.add_argument("--stuck-after", type=float, default=180.0, help="stuck: not final this long after healing")
    parser.add_argument("--only", choices=("on", "off"), help=f"run one soak, replacing its column in {RESULTS.name}")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/reliability.md")
    parser.add_argument("--table-only", action="store_true", help=f"no soak: the table from {RESULTS.name}")
    parser.add_argument("--recheck", type=Path, metavar="DIR",
                        help="no soak: check the evidence a soak left in DIR again (a changed checker)")  # fmt: skip
    args = parser.parse_args()

    if args.table_only or args.recheck:
        saved = json.loads(RESULTS.read_text())
        for report in saved["reports"] if args.recheck else ():
            report.update(check(json.loads((args.recheck / report["label"] / "evidence.json").read_text())))
        if args.recheck:
            RESULTS.write_text(json.dumps(saved, indent=1, default=str) + "\n")
    else:
        workdir = Path(tempfile.mkdtemp(prefix="renderfarm-chaos-"))
        reports = [soak(workdir, label, every, args.duration, args.seed, args.mean_gap, args.stuck_after)
                   for label, every in (("on", args.checkpoint_every), ("off", 0.0))
                   if args.only in (None, label)]  # fmt: skip
        if args.only:  # the other column from the last run
            kept = [r for r in json.loads(RESULTS.read_text())["reports"] if r["label"] != args.only]
            reports = sorted(kept + reports, key=lambda r: r["label"] != "on")
        saved = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "args": vars(args), "reports": reports}
        RESULTS.write_text(json.dumps(saved, indent=1, default=str) + "\n")
        print(f"reports: {RESULTS} (worker logs under {workdir})")
    text = body(saved)
    print(text)
    if args.write_docs:
        replace_section(ROOT / "docs" / "reliability.md", "chaos", text)


if __name__ == "__main__":
    main()
