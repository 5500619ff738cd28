"""The operator's commands as a user runs them: worker, workers, doctor (real Redis, S3, workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tasks.engines.tiny_wan import ensure_tiny_wan
from tests.support import PACED, ROOT, free_port, wait_for
from worker_config.routing import queue_for

RENDERFARM = [sys.executable, "-m", "renderfarm.cli"]
HEALTHCHECK = [sys.executable, "-m", "tasks.worker.healthcheck"]
SLOW = {"num_frames": 9, "height": 64, "width": 64, "num_inference_steps": 80}  # paced: 8 s or more


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*RENDERFARM, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_worker_plans_one_worker_per_gpu_group_with_its_own_devices_and_metrics_port(worker_env):
    env = {**worker_env, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "NUM_GPUS": "2", "METRICS_PORT": "9100"}
    plans = json.loads(run(["worker", "--dry-run"], env).stdout)
    assert [p["name"] for p in plans] == ["render-tiny-wan-gpu0-1", "render-tiny-wan-gpu2-3"]  # model and GPUs
    assert [p["env"] for p in plans] == [
        {"CUDA_VISIBLE_DEVICES": "0,1", "METRICS_PORT": "9100"},
        {"CUDA_VISIBLE_DEVICES": "2,3", "METRICS_PORT": "9101"},
    ]
    for plan in plans:
        argv = plan["argv"]
        assert argv[1:6] == ["-m", "celery", "-A", "tasks", "worker"]
        assert {"--pool=prefork", "--concurrency=1", "-E"} <= set(argv)
        # What it consumes, truly: no DEFAULT_MODEL, so `render` and its own queue.
        assert argv[argv.index("-Q") + 1] == "render,render.tiny-wan"
        assert argv[argv.index("-n") + 1] == f"{plan['name']}@%h"
    (one,) = json.loads(run(["worker", "--dry-run"], {**env, "CUDA_VISIBLE_DEVICES": "3", "NUM_GPUS": "1"}).stdout)
    assert one["name"] == "render-tiny-wan-gpu3" and one["env"] == {"CUDA_VISIBLE_DEVICES": "3"}

    cpu = {k: v for k, v in worker_env.items() if k != "CUDA_VISIBLE_DEVICES"}
    cpu["PATH"] = "/usr/bin:/bin"  # no nvidia-smi here: a CPU machine
    (plan,) = json.loads(run(["worker", "--dry-run"], cpu).stdout)
    assert plan["name"] == "render-tiny-wan" and plan["env"] == {}
    # A worker of a model that is not the farm's default consumes only its own queue, and says so;
    # a separate webhook queue is added, --name names it.
    other = {**cpu, "MODEL_ID": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "DEFAULT_MODEL": "tiny-wan",
             "WEBHOOK_QUEUE": "webhooks"}  # fmt: skip
    (plan,) = json.loads(run(["worker", "--dry-run", "--name", "big"], other).stdout)
    argv = plan["argv"]
    assert argv[argv.index("-Q") + 1] == "render.wan-ai-wan2.1-t2v-1.3b-diffusers,webhooks"
    assert plan["name"] == "big" and argv[argv.index("-n") + 1] == "big@%h"


def start_cli_worker(env: dict[str, str], log_path: Path, *args: str) -> subprocess.Popen:
    log = open(log_path, "wb")  # the child holds it; closed here at once
    try:
        return subprocess.Popen([*RENDERFARM, "worker", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    finally:
        log.close()


def test_two_worker_commands_of_two_models_on_one_host_get_their_own_names_and_a_clash_is_refused(
    worker_env, producer, model_cache, tmp_path
):
    """issue 25.8: both were `render@host`, hid each other in `workers`/`models` and shared a health folder."""
    other = str(ensure_tiny_wan(model_cache))  # the same weights under another model id: a second model
    farm = {**worker_env, "DEFAULT_MODEL": "tiny-wan", "METRICS_ADDR": "127.0.0.1", **PACED}
    env = {**farm, "METRICS_PORT": str(free_port())}
    env2 = {**farm, "MODEL_ID": other, "ENGINE": "diffusers", "DEVICE": "cpu", "METRICS_PORT": str(free_port())}
    name2 = "render-" + queue_for(other, None).removeprefix("render.")
    procs = [start_cli_worker(env, tmp_path / "worker.log"), start_cli_worker(env2, tmp_path / "worker2.log")]
    try:

        def listed() -> dict[str, dict] | None:
            done = run(["workers", "--json", "--timeout", "1"], env)
            assert done.returncode == 0, done.stderr
            found = {w["worker"].split("@")[0]: w for w in json.loads(done.stdout)}
            return found if len(found) == 2 else None

        found = wait_for(listed, 120, "both workers to answer", interval=0.5)
        assert set(found) == {"render-tiny-wan", name2}  # type: ignore[arg-type]
        first, second = found["render-tiny-wan"], found[name2]  # type: ignore[index]
        assert (first["model"], first["engine"], first["queues"]) == (
            "tiny-wan",
            "diffusers",
            ["render", "render.tiny-wan"],
        )
        assert (second["model"], second["queues"]) == (other, [queue_for(other, "tiny-wan")])
        assert first["answers"] == second["answers"] == 1
        models = {row["model"]: row["worker_names"] for row in json.loads(run(["models", "--json"], env).stdout)}
        assert models == {"tiny-wan": [first["worker"]], other: [second["worker"]]}
        # Each its own health folder: both pass their liveness probe, by name.
        for name in ("render-tiny-wan", name2):
            probe = subprocess.run([*HEALTHCHECK, "--probe", "live", "--name", name], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=60)  # fmt: skip
            assert probe.returncode == 0, probe.stderr
        assert sorted(p.name.split("@")[0] for p in (tmp_path / "health").iterdir()) == sorted(
            ["render-tiny-wan", name2]
        )

        # The same model again on this host: refused before it starts, naming --name.
        third = run(["worker"], env, timeout=60)
        assert third.returncode == 2 and "Traceback" not in third.stderr
        assert f"a worker named {first['worker']} is already running" in third.stderr and "--name" in third.stderr

        # What `workers` shows of a busy worker: the render it runs, its stage and step.
        slow = producer.send_task("tasks.render", kwargs={"prompt": "watch me", **SLOW}, queue="render")
        wait_for(lambda: slow.state == "PROGRESS", 120, "the render to make progress")
        busy = listed()["render-tiny-wan"]  # type: ignore[index]
        table = run(["workers", "--timeout", "1"], {**env, "COLUMNS": "250"}).stdout
        assert slow.state == "PROGRESS", "the render ended before both listings: make it slower"
        assert busy["status"] == "busy" and busy["active"][0]["id"] == slow.id
        assert busy["active"][0]["prompt"] == "watch me"
        assert "render-tiny-wan@" in table and "busy" in table and slow.id[:8] in table, table
        slow.get(timeout=180)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
    assert [proc.returncode for proc in procs] == [0, 0]
    text = (tmp_path / "worker.log").read_text()
    assert "starting worker render-tiny-wan (CPU): " in text and "-Q render,render.tiny-wan -E" in text
    assert "metrics on http://127.0.0.1:" in text
    assert f"-Q {queue_for(other, 'tiny-wan')} -E" in (tmp_path / "worker2.log").read_text()


def test_workers_and_doctor_name_two_workers_that_answer_under_one_name(worker_env, start_worker):
    """A clash made by hand (`celery ... -n` twice): `renderfarm workers` warns and `doctor` fails, naming it."""
    light = ("-Q", "webhooks", "--pool=threads", "--concurrency=1")  # no model to load: quick to start
    first = start_worker(wait=False, args=light)
    second = start_worker(wait=False, args=(*light, "-n", first.hostname))
    for worker in (first, second):
        wait_for(lambda w=worker: " ready." in w.log, 60, "the light workers")
    listed = run(["workers", "--json", "--timeout", "1"], worker_env)
    (entry,) = json.loads(listed.stdout)
    assert entry["worker"] == first.hostname and entry["answers"] == 2 and entry["renders"] is False
    assert f"several workers answer as {first.hostname}" in listed.stderr
    doctor = run(["doctor", "--producer"], worker_env)
    assert doctor.returncode == 1 and f"FAIL workers: several workers answer as {first.hostname}" in doctor.stderr
    assert "fix: give each worker its own name" in doctor.stderr


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
