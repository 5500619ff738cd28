"""The ``renderfarm`` command as a user runs it: the demo, submit/status/result against a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT, ffprobe

RENDERFARM = [sys.executable, "-m", "renderfarm.cli"]


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RENDERFARM, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_renders_through_the_queue_and_saves_a_playable_mp4(tmp_path, model_cache):
    env = {**os.environ, "MODEL_CACHE_DIR": str(model_cache)}
    done = run(["demo", "--out", str(tmp_path), "--frames", "9", "--height", "64", "--width", "96"], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    video = Path(done.stdout.strip().splitlines()[-1])
    assert video.parent == tmp_path and video.suffix == ".mp4"
    assert "render.delay(prompt='a red fox running through fresh snow'" in done.stderr
    assert "Video: " in done.stderr and "Object: s3://renders/renders/" in done.stderr
    stream = ffprobe(video)
    assert (stream["codec_name"], stream["width"], stream["height"], stream["nb_read_frames"]) == ("h264", 96, 64, "9")


def test_submit_wait_status_and_result(start_worker, worker_env, tmp_path):
    start_worker()
    env = {**worker_env}
    done = run(
        ["submit", "a boat on a lake", "--frames", "5", "--seed", "3", "--wait", "--save", str(tmp_path / "a.mp4")], env
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout: the result only; the task id on stderr (no terminal here)
    task_line = next(line for line in done.stderr.splitlines() if line.startswith("task id: "))
    waited = task_line.removeprefix("task id: ")
    assert json.loads(run(["status", waited], env).stdout)["state"] == "SUCCESS"
    assert (
        result["num_frames"] == 5
        and result["seed"] == 3
        and (tmp_path / "a.mp4").stat().st_size == result["size_bytes"]
    )

    task_id = run(["submit", "a boat on a lake", "--frames", "5", "--seed", "3"], env).stdout.strip()
    again = json.loads(run(["result", task_id], env).stdout)
    assert again["cached"] is True and again["key"] == result["key"]
    status = json.loads(run(["status", task_id], env).stdout)
    assert status["state"] == "SUCCESS" and status["id"] == task_id


def test_submit_rejects_a_bad_request_in_one_line_without_a_round_trip(worker_env):
    done = run(["submit", "x", "--height", "17"], {**worker_env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: invalid render request: height: Input should be a multiple of 16"
    ]
    assert "Traceback" not in done.stderr


def test_upload_image_without_storage_credentials_names_them_and_the_inline_way(worker_env, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    env = {k: v for k, v in worker_env.items() if k not in ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY")}
    done = run(["upload-image", str(tmp_path / "red.png")], env, timeout=120)
    assert done.returncode == 1 and not done.stdout and "Traceback" not in done.stderr
    assert "error: MINIO_ACCESS_KEY and MINIO_SECRET_KEY must be set to upload an image" in done.stderr
    assert "image=tasks.images.data_url(path)" in done.stderr and "store videos" not in done.stderr
