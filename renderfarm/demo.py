"""``renderfarm demo``: one real render through the real queue, on this machine's CPU.

Starts a local redis-server and S3 endpoint on loopback, one prefork worker serving tiny-wan,
submits ``render.delay(...)``, shows its progress, downloads the MP4 through its presigned URL
and stops everything again.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console

from renderfarm.localstack import RedisServer, S3Server, WorkerProcess
from renderfarm.progress import wait_for_render

__all__ = ["run_demo"]


def run_demo(console: Console, out_dir: Path, keep_logs: bool = False, **request: Any) -> Path:
    """Render ``request`` end to end; return the path of the downloaded MP4."""
    workdir = Path(tempfile.mkdtemp(prefix="renderfarm-demo-"))
    with contextlib.ExitStack() as stack:
        console.print("[bold]1/4[/] starting redis-server and a local S3 endpoint on loopback")
        redis = RedisServer(workdir)
        stack.callback(redis.stop)
        s3 = S3Server()
        stack.callback(s3.stop)
        env = {
            "REDIS_URL": redis.url,
            "MINIO_ENDPOINT": s3.endpoint,
            "MINIO_ACCESS_KEY": "demo",
            "MINIO_SECRET_KEY": secrets.token_hex(16),
            "MINIO_BUCKET": "renders",
            "MODEL_ID": "tiny-wan",
            "ENGINE": "diffusers",
            "SPOOL_DIR": str(workdir / "spool"),
        }
        os.environ.update(env)  # this process is the producer: the same settings, read once on import

        log_path = workdir / "worker.log"
        console.print(
            "[bold]2/4[/] starting a worker: celery -A tasks worker --pool=prefork --concurrency=1 -Q render "
            f"(log: {log_path})",
            soft_wrap=True,
        )
        worker = WorkerProcess("demo", {**os.environ, **env}, log_path)
        stack.callback(worker.stop)
        with console.status("loading tiny-wan in the worker's pool process (the first run builds it)"):
            worker.wait_ready(timeout=300)

        from tasks import render

        console.print(f"[bold]3/4[/] render.delay({_show(request)})", soft_wrap=True)
        async_result = render.delay(**request)
        result = wait_for_render(async_result, timeout=900, show_bar=True)

        console.print("[bold]4/4[/] downloading the MP4 through its presigned URL")
        out_dir.mkdir(parents=True, exist_ok=True)
        video = out_dir / f"{result['sha256'][:16]}.mp4"
        with urllib.request.urlopen(result["url"], timeout=60) as response:
            video.write_bytes(response.read())
        _report(console, result, video.resolve())
    if keep_logs:
        console.print(f"worker log kept in {log_path}")
    return video.resolve()


def _show(request: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in request.items())


def _report(console: Console, result: dict[str, Any], video: Path) -> None:
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result["timings"].items())
    console.print(
        f"\n[bold green]Video:[/] {video}\n"
        f"  {result['width']}x{result['height']}, {result['num_frames']} frames at {result['fps']} fps, "
        f"{result['size_bytes']} bytes, sha256 {result['sha256'][:16]}..., seed {result['seed']}\n"
        f"  model {result['model']} on engine {result['engine']}, rendered by {result['worker']}\n"
        f"  timings: {stages}\n"
        f"[bold]Object:[/] s3://{result['bucket']}/{result['key']}\n"
        f"[bold]URL:[/] {result['url']}\n"
        "  (the demo's S3 endpoint stops with the demo: the URL is for show, the file above is yours)",
        soft_wrap=True,
    )
