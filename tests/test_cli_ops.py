"""The operator's commands as a user runs them: worker, workers, doctor (real Redis, S3, workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support import PACED, ROOT, free_port, wait_for

RENDERFARM = [sys.executable, "-m", "renderfarm.cli"]
SLOW = {"num_frames": 9, "height": 64, "width": 64, "num_inference_steps": 80}  # paced: 8 s or more


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*RENDERFARM, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_worker_plans_one_worker_per_gpu_group_with_its_own_devices_and_metrics_port(worker_env):
    env = {**worker_env, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "NUM_GPUS": "2", "METRICS_PORT": "9100"}
    plans = json.loads(run(["worker", "--dry-run"], env).stdout)
    assert [p["name"] for p in plans] == ["render-gpu0", "render-gpu1"]
    assert [p["env"] for p in plans] == [
        {"CUDA_VISIBLE_DEVICES": "0,1", "METRICS_PORT": "9100"},
        {"CUDA_VISIBLE_DEVICES": "2,3", "METRICS_PORT": "9101"},
    ]
    for plan in plans:
        argv = plan["argv"]
        assert argv[1:6] == ["-m", "celery", "-A", "tasks", "worker"]
        assert {"--pool=prefork", "--concurrency=1", "-E"} <= set(argv)
        assert argv[argv.index("-Q") + 1] == "render" and argv[argv.index("-n") + 1] == f"{plan['name']}@%h"

    cpu = {k: v for k, v in worker_env.items() if k != "CUDA_VISIBLE_DEVICES"}
    cpu["PATH"] = "/usr/bin:/bin"  # no nvidia-smi here: a CPU machine
    (plan,) = json.loads(run(["worker", "--dry-run"], cpu).stdout)
    assert plan["name"] == "render" and plan["env"] == {}


def test_worker_command_starts_a_worker_that_workers_lists_with_its_model_and_current_render(
    worker_env, producer, tmp_path
):
    env = {**worker_env, "METRICS_PORT": str(free_port()), "METRICS_ADDR": "127.0.0.1", **PACED}
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([*RENDERFARM, "worker", "--name", "cli"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:

        def listed() -> list[dict] | None:
            done = run(["workers", "--json", "--timeout", "1"], env)
            assert done.returncode == 0, done.stderr
            found = json.loads(done.stdout)
            return found or None

        (entry,) = wait_for(listed, 120, "the worker to answer", interval=0.5)  # type: ignore[misc]
        assert entry["worker"].startswith("cli@") and entry["model"] == "tiny-wan" and entry["engine"] == "diffusers"
        assert entry["queues"] == ["render", "render.tiny-wan"]  # no DEFAULT_MODEL: render and its own
        slow = producer.send_task("tasks.render", kwargs={"prompt": "watch me", **SLOW}, queue="render")
        wait_for(lambda: slow.state == "PROGRESS", 120, "the render to make progress")
        (busy,) = json.loads(run(["workers", "--json", "--timeout", "1"], env).stdout)
        table = run(["workers", "--timeout", "1"], {**env, "COLUMNS": "200"}).stdout
        assert slow.state == "PROGRESS", "the render ended before both listings: make it slower"
        assert busy["status"] == "busy" and busy["active"][0]["id"] == slow.id
        assert busy["active"][0]["prompt"] == "watch me"
        assert "cli@" in table and "tiny-wan" in table and "busy" in table and slow.id[:8] in table, table
        slow.get(timeout=180)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        log.close()
    assert proc.returncode == 0
    text = (tmp_path / "worker.log").read_text()
    assert "starting worker cli (CPU)" in text and "metrics on http://127.0.0.1:" in text


def test_doctor_passes_on_a_working_stack_and_names_the_broken_part(worker_env, producer):
    producer.send_task("tasks.render", kwargs={"prompt": "waiting"}, queue="render", priority=9)  # no worker runs
    done = run(["doctor"], worker_env)
    assert done.returncode == 0, done.stderr
    assert "1 render(s) waiting in queue 'render'" in done.stderr
    for name in ("broker", "workers", "storage", "webhooks", "PyTorch", "/dev/shm", "Multiprocessing", "model"):
        assert any(line.startswith(f"ok   {name}:") for line in done.stderr.splitlines()), (name, done.stderr)
    assert "all checks passed" in done.stderr

    broken = run(["doctor", "--producer"], {**worker_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    lines = broken.stderr.strip().splitlines()
    assert lines[0].startswith("FAIL broker: Redis at REDIS_URL does not answer")
    assert lines[1].strip().startswith("fix: start Redis or fix REDIS_URL")
    assert lines[-1] == "error: 1 check(s) failed: broker"


def test_commands_fail_in_one_line_without_a_broker(worker_env):
    env = {**worker_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = run(["workers"], env, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip().splitlines()[0]]
    assert done.stderr.startswith("error: could not reach the broker at REDIS_URL")
    bad = run(["worker", "--dry-run"], {**worker_env, "NUM_GPUS": "0"})
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: invalid settings: NUM_GPUS")


def _fake_hub_cache(home: Path, repo: str, commit: str) -> Path:
    """A Hugging Face cache holding one snapshot of ``repo``, as ``snapshot_download`` leaves it."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    (snapshot / "transformer").mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    (snapshot / "transformer" / "config.json").write_text("{}")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snapshot


def test_fetch_model_gets_the_weights_at_the_pinned_revision(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "HF_"))}
    env.update(MODEL_CACHE_DIR=str(tmp_path / "models"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "renderfarm.cli", "fetch-model"]

    built = subprocess.run(command, env={**env, "MODEL_ID": "tiny-wan"}, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert Path(built.stdout.strip()) == tmp_path / "models" / "tiny-wan-v1"

    # A Hub model at a pinned commit, already in the cache (here: no network, HF_HUB_OFFLINE).
    pinned, other = "a" * 40, "b" * 40
    snapshot = _fake_hub_cache(tmp_path / "hf", "acme/wan-test", pinned)
    hub = {**env, "MODEL_ID": "acme/wan-test", "MODEL_REVISION": pinned}
    found = subprocess.run(command, env=hub, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == snapshot and f"acme/wan-test at {pinned}" in found.stderr

    # Another revision is not that snapshot: a clear refusal, nothing loaded from the wrong weights.
    missing = subprocess.run(command, env={**hub, "MODEL_REVISION": other}, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert missing.returncode == 1 and not missing.stdout
    assert f"cannot fetch MODEL_ID=acme/wan-test at MODEL_REVISION={other}" in missing.stderr
    assert "HF_HUB_OFFLINE" in missing.stderr


def test_both_engines_load_a_hub_model_at_model_revision(tmp_path):
    from tasks.engines.fastvideo_engine import load_options
    from tasks.engines.weights import hub_revision
    from worker_config.settings import Settings

    pinned = Settings(MODEL_ID="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", MODEL_REVISION="c" * 40)
    assert hub_revision(pinned) == "c" * 40 and load_options(pinned, cpu=False)["revision"] == "c" * 40
    local = Settings(MODEL_ID=str(tmp_path), MODEL_REVISION="c" * 40)  # a directory has no revisions
    assert hub_revision(local) is None and "revision" not in load_options(local, cpu=False)
    assert "revision" not in load_options(Settings(MODEL_ID="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), cpu=False)
