"""The chaos soak's short form (issue 27): a stream of renders through one of each fault, checkpoints on.

Three real tiny-wan workers (one in a network namespace of its own), a real Redis with its
append-only file, moto behind a switch that stops and starts it, and an orchestrator that
replaces any worker that exits (``bench.chaos_farm``). For 100 s the producer keeps five renders
of 8 to 80 paced steps waiting or running while six faults land, one of each kind, most of them
mid-denoising (``bench.chaos_faults``, seed 2): a pool process SIGKILLed, a worker SIGKILLed, a
worker SIGTERMed, Redis killed and restarted, storage stopped and started, the namespaced
worker's link cut and healed. The checker (``bench.chaos_check``) then reads every request's
history from the result backend, the bucket, the workers' logs and their metrics.

It fails on any request lost, stuck (not final 90 s after the last fault was healed) or completed
more than once, on a stored video that is not its result's bytes, on a resumed render whose bytes
differ from an uninterrupted one, and where the farm's own step counts (its per-delivery log line,
its metrics) disagree with what the engine reported. ``make chaos`` is the long form, with figures.
Needs root (network namespaces); skips elsewhere with the reason (CI runs it as root).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos_faults import KINDS, plan
from bench.chaos_soak import soak
from tests.netns import available

pytestmark = pytest.mark.skipif((why := available()) is not None, reason=why or "")

SEED, DURATION_S, MEAN_GAP_S = 2, 100.0, 10.0


def test_the_schedule_holds_one_fault_of_each_kind_and_is_the_same_for_the_same_seed():
    first = plan(SEED, DURATION_S, MEAN_GAP_S)
    assert sorted(p.kind for p in first) == sorted(KINDS)
    assert plan(SEED, DURATION_S, MEAN_GAP_S) == first and plan(SEED + 1, DURATION_S, MEAN_GAP_S) != first


def test_a_short_chaos_soak_loses_nothing_and_completes_nothing_twice(tmp_path: Path, model_cache: Path):
    report = soak(tmp_path, "ci", 1.0, DURATION_S, SEED, MEAN_GAP_S, stuck_after_s=90.0, verify=1,
                  model_cache=model_cache)  # fmt: skip
    assert sorted(report["faults_by_kind"]) == sorted(KINDS)
    assert report["requests"] >= 10
    assert report["lost"] == 0, f"lost: {report['lost_ids']} (broken results among them: {report['broken_ids']})"
    assert report["stuck"] == 0, f"stuck: {report['stuck_ids']}"
    assert report["completed_more_than_once"] == 0, report["completed_more_than_once_ids"]
    assert report["completed"] + report["failed"] == report["requests"]
    assert report["sigterm_past_grace"] == 0
    assert report["farm_step_lines_disagreeing"] == 0 and report["metrics_disagreeing"] == []
    assert all(v["same"] for v in report["verified"]), report["verified"]
    term = next(f for f in report["faults"] if f["kind"] == "worker_term")
    if term["mid_denoising"] and term["affected"]:  # it hit a render: handed back, not lost with its worker
        assert report["hand_backs"] >= 1
