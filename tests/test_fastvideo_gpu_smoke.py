"""``make gpu-smoke``'s CPU twin, on a host without a network: the GPU smoke check end to end on tiny shapes.

The same script, on ``--device cpu``: a real redis-server, S3 endpoint and one real worker per row
(diffusers, FastVideo mp with and without expandable segments, FastVideo ray), the direct calls, the
out-of-memory path with the address space of FastVideo's worker capped, and the checkpoint row (a
save after every step, and the real shapes' state saved from the smoke's process). Run in .venv-fastvideo.

It runs in a network namespace with nothing but loopback (``tests.netns.LoopbackOnly``; root), as on
an air-gapped GPU node: FastVideo's ``get_ip()`` finds no route there and answers 0.0.0.0, while Ray's
node is 127.0.0.1 (issue 25). Its ``fastvideo-ray`` row is therefore the test that a real worker with
the Ray executor renders on such a host, and its direct call that the engine alone does. This run
replaces the one that ran on the host's own network (CI time): nothing in the smoke needs more than
loopback. Without root it runs on the host's network, and says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import LoopbackOnly, available

try:
    import fastvideo  # noqa: F401
except ImportError:
    pytest.skip("fastvideo is not installed in this venv: .venv-fastvideo runs this", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
RENDER_ROWS = ("diffusers", "fastvideo-mp", "fastvideo-mp-expandable", "fastvideo-ray")
NO_NAMESPACE = available(tools=("ip",))

pytestmark = pytest.mark.timeout(1500)


def test_the_smoke_check_runs_every_row_on_the_cpu_without_a_network_and_prints_one_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "MINIO_", "MODEL_", "ENGINE"))}
    env.pop("FASTVIDEO_HOST_IP", None)  # the worker must find Ray's address itself
    work = tmp_path / "work"
    with LoopbackOnly() if NO_NAMESPACE is None else contextlib.nullcontext() as namespace:
        wrap: tuple[str, ...] = ()
        if namespace is not None:
            assert namespace.links() == ["lo"] and namespace.routes() == []  # nothing but loopback
            wrap = namespace.wrap
        else:
            print(f"not in a loopback-only namespace ({NO_NAMESPACE}): on the host's network")
        done = subprocess.run(
            [*wrap, sys.executable, "-m", "bench.gpu_smoke", "--device", "cpu", "--work", str(work),
             "--out", str(tmp_path / "out")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == [*RENDER_ROWS, "out-of-memory", "checkpoint"]

    for name in RENDER_ROWS:  # each rendered through the queue, timed by stage, and called directly
        row = rows[name]
        assert row["ok"] and row["outcome"] == "rendered", row
        assert row["load_s"] > 0 and row["stages"]["denoising"] > 0 and row["stages"]["uploading"] > 0
        assert row["end_to_end_s"] >= row["stages"]["total"] > 0 and row["direct_s"] > 0
        assert row["overhead_s"] == pytest.approx(row["end_to_end_s"] - row["direct_s"])
        assert row["peak_memory_mb"] > 100 and row["memory_source"] == "rss"
    # What the worker chose, and the operator's value winning; the start-up hand-over of FastVideo's mp executor.
    assert rows["fastvideo-mp"]["allocator"] == "unset"
    assert rows["fastvideo-mp-expandable"]["allocator"] == "expandable_segments:True (operator)"
    assert rows["diffusers"]["allocator"] == "expandable_segments:True"
    assert rows["fastvideo-mp"]["hand_over"] == "cpu tensor from a spawned process, through shared memory"
    # The Ray row's worker gave FastVideo the address of its Ray node, and said so.
    ray_log = (work / "fastvideo-ray.log").read_text()
    if namespace is not None:
        assert "FASTVIDEO_HOST_IP=127.0.0.1 for FastVideo's Ray executor: the address of this process's Ray node " \
               "(FastVideo's own guess, from the default route: 0.0.0.0)" in ray_log  # fmt: skip
    else:
        assert "FASTVIDEO_HOST_IP=" in ray_log and "the address of this process's Ray node" in ray_log

    oom = rows["out-of-memory"]
    assert oom["ok"], oom
    assert "RenderOutOfMemory (out of memory twice on cpu rendering 512x512 x 65 frames (1 steps)" in oom["outcome"]
    assert "1 more try" in oom["outcome"] and "without reload: yes" in oom["outcome"]
    assert "redelivered: no" in oom["outcome"]

    checkpoint = rows["checkpoint"]
    assert checkpoint["ok"] and " saves of 0.1 MB" in checkpoint["outcome"], checkpoint
    assert "Wan2.1-1.3B 480x832x81: 33.5 MB" in checkpoint["outcome"]  # the real shapes' state, saved and read back
    assert "Wan2.2-TI2V-5B 704x1280x121: 83.8 MB" in checkpoint["outcome"]

    table = (tmp_path / "out" / "table.md").read_text()
    assert table in done.stdout  # printed, as written
    assert table.count("\n| ") == 1 + len(rows)  # one heading and a line per row
    assert "Model: random weights, tiny-wan's shapes" in table and "Median queue overhead" in table
    assert "each row at most 300 s, the run 1200 s" in done.stdout  # the CPU defaults of the time limits
