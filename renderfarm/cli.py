"""The ``renderfarm`` command: demo, submit, status, cancel, result; workers, worker, doctor.

Errors print one clear line (and the fix where known), not a traceback.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Render videos from text prompts on a Celery farm.")
console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # one line, however long
    raise typer.Exit(code)


def _redis_trouble(exc: BaseException, auth_only: bool = False) -> str | None:
    """One line when ``exc`` is a failure to use Redis (a refused password named as such; an outage
    that outlasted the retries), None when it is anything else (a render's own error). With
    ``auth_only``, only a refused password."""
    import redis
    from celery.exceptions import BackendError
    from kombu.exceptions import OperationalError

    from worker_config.redis_link import RedisAuthError, auth_error, explain, redacted
    from worker_config.settings import get_broker_settings

    url = get_broker_settings().REDIS_URL
    if auth_error(exc) is not None:
        return explain(url, exc)
    if auth_only:
        return None
    if isinstance(exc, RedisAuthError | redis.RedisError | BackendError | OperationalError | ConnectionError):
        return f"could not use Redis at REDIS_URL ({redacted(url)}): {type(exc).__name__}: {exc}"
    return None


Height = Annotated[int | None, typer.Option(help="Frame height in pixels (multiple of 16).")]
Width = Annotated[int | None, typer.Option(help="Frame width in pixels (multiple of 16).")]
Frames = Annotated[int | None, typer.Option("--frames", help="Number of frames (4k+1).")]
Steps = Annotated[int | None, typer.Option("--steps", help="Denoising steps.")]
Seed = Annotated[int | None, typer.Option(help="Random seed (default: derived from the task id).")]
Fps = Annotated[int | None, typer.Option(help="Frames per second of the MP4.")]


class Priority(StrEnum):
    high = "high"
    normal = "normal"
    low = "low"


def _request(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}


@app.command()
def demo(
    prompt: Annotated[str, typer.Argument(help="What to render.")] = "a red fox running through fresh snow",
    out_dir: Annotated[Path, typer.Option("--out", help="Where to save the MP4.")] = Path("out"),
    height: Height = 128,
    width: Width = 128,
    frames: Frames = 17,
    steps: Steps = 6,
    seed: Seed = 42,
    fps: Fps = 8,
) -> None:
    """One real render through the real queue on this machine's CPU (tiny-wan), saved under --out."""
    from renderfarm.demo import run_demo

    request = _request(
        prompt, height=height, width=width, num_frames=frames, num_inference_steps=steps, seed=seed, fps=fps
    )
    try:
        video = run_demo(console, out_dir, **request)
    except (RuntimeError, TimeoutError) as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        _fail(f"{type(exc).__name__}: {exc}")
    typer.echo(str(video))


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="What to render.")],
    height: Height = None,
    width: Width = None,
    frames: Frames = None,
    steps: Steps = None,
    seed: Seed = None,
    fps: Fps = None,
    negative_prompt: Annotated[str | None, typer.Option(help="What to avoid.")] = None,
    force: Annotated[bool, typer.Option(help="Render again even if the same video is stored.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait with a progress bar and print the result.")] = False,
    save: Annotated[Path | None, typer.Option(help="With --wait: download the MP4 here.")] = None,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds.")] = 3600.0,
    priority: Annotated[Priority, typer.Option(help="Queue priority: high runs before normal, normal before low.")] = (
        Priority.normal
    ),
    webhook_url: Annotated[
        str | None, typer.Option(help="POST the signed result here when done (host must be allow-listed).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="The model to render with (default: DEFAULT_MODEL).")] = None,
    image: Annotated[
        str | None,
        typer.Option(help="First frame, for models that take an image: a local file (sent inline) or s3://bucket/key."),
    ] = None,
) -> None:
    """Send a render to the queue (REDIS_URL); print its task id (with --wait on stderr, then the result)."""
    from tasks import InvalidRequest, render
    from tasks.images import data_url
    from tasks.schemas import parse_request
    from worker_config.celery_config import PRIORITIES

    if image is not None and Path(image).is_file():
        try:
            image = data_url(Path(image))
        except ValueError as exc:
            _fail(f"--image {image}: {exc}", 2)
    request = _request(prompt, height=height, width=width, num_frames=frames, num_inference_steps=steps, seed=seed,
                       fps=fps, negative_prompt=negative_prompt, force=force or None,
                       webhook_url=webhook_url, model=model, image=image)  # fmt: skip
    try:
        parse_request(request)  # the worker validates again; this fails fast without a round trip
        async_result = render.apply_async(kwargs=request, priority=PRIORITIES[priority.value])
    except InvalidRequest as exc:
        _fail(str(exc), 2)
    except Exception as exc:  # noqa: BLE001
        _fail(_redis_trouble(exc) or f"could not reach the broker at REDIS_URL: {exc}")
    if not wait:
        typer.echo(async_result.id)
        return
    # stdout keeps only the result (JSON); the id goes to stderr first, terminal or not, so a render
    # that outlives this command can be found again (`renderfarm status`, `result`, `cancel`).
    console.print(f"task id: {async_result.id}", highlight=False)
    _wait_and_print(async_result, timeout, save)


def _wait_and_print(async_result: Any, timeout: float, save: Path | None) -> None:
    from renderfarm.progress import wait_for_render

    try:
        result = wait_for_render(async_result, timeout=timeout)
    except TimeoutError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - Redis's trouble, or the task's own error: one line
        if (trouble := _redis_trouble(exc)) is not None:  # not the render's fault: it may have succeeded
            _fail(f"could not read the outcome of render {async_result.id}: {trouble}")
        _fail(f"render {async_result.id} failed: {type(exc).__name__}: {exc}")
    if save is not None:
        _download(result["url"], save)
        console.print(f"saved {save}")
    typer.echo(json.dumps(result, indent=2))


def _download(url: str, path: Path) -> None:
    import urllib.request

    path.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=300) as response:
        path.write_bytes(response.read())


@app.command()
def status(task_id: str) -> None:
    """Print a render's state and progress."""
    from renderfarm.progress import describe
    from tasks import app as celery_app

    result = celery_app.AsyncResult(task_id)
    try:
        state, info = result.state, result.info
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        _fail(_redis_trouble(exc) or f"could not read render {task_id}: {type(exc).__name__}: {exc}")
    info = info if isinstance(info, dict) else ({"error": str(info)} if info else {})
    typer.echo(json.dumps({"id": task_id, "state": state, "progress": describe(state, info), "info": info}))


# What `renderfarm cancel` exits with, per outcome (tasks.cancel.Outcome).
_CANCEL_EXIT = {"stopped": 0, "queued": 0, "revoked": 0, "finished": 3, "failed": 3, "unknown": 4, "running": 5}


@app.command()
def cancel(
    task_id: str,
    wait: Annotated[float, typer.Option(help="Seconds to wait for a running render to stop.")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
) -> None:
    """Cancel a render and say what came of it: stopped (where), still queued (discarded when a worker
    receives it), still running after --wait, already finished, failed or cancelled, or unknown.

    Exit code: 0 stopped, queued or cancelled before; 3 it had finished or failed (nothing to
    cancel); 4 no such render; 5 still running after --wait (the cancel stands); 1 Redis unusable.
    """
    from tasks import app as celery_app
    from tasks.cancel import cancel as cancel_render

    try:
        outcome = cancel_render(task_id, celery_app, wait_s=wait)
    except Exception as exc:  # noqa: BLE001
        _fail(_redis_trouble(exc) or f"could not cancel {task_id}: {type(exc).__name__}: {exc}")
    typer.echo(json.dumps(outcome.as_dict()) if as_json else outcome.message())
    raise typer.Exit(_CANCEL_EXIT[outcome.outcome.value])


@app.command()
def result(
    task_id: str,
    save: Annotated[Path | None, typer.Option(help="Download the MP4 here.")] = None,
    timeout: Annotated[float, typer.Option(help="Wait at most this many seconds.")] = 3600.0,
) -> None:
    """Wait for a render's result, print it, and optionally download the MP4."""
    from tasks import app as celery_app

    _wait_and_print(celery_app.AsyncResult(task_id), timeout, save)


@app.command()
def workers(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for answers.")] = 2.0,
) -> None:
    """Which workers are up, what each consumes, the model each serves and what each is doing."""
    from renderfarm.fleet import clashes, survey
    from tasks import app as celery_app

    celery_app.conf.broker_connection_retry = False
    celery_app.conf.broker_connection_timeout = 5
    try:
        found = survey(celery_app, timeout)
    except Exception as exc:  # noqa: BLE001
        _fail(
            _redis_trouble(exc, auth_only=True)
            or f"could not reach the broker at REDIS_URL: {type(exc).__name__}: {exc}"
        )
    for name in clashes(found):
        console.print(f"[bold red]warning:[/] several workers answer as {name}: each hides the others here and "
                      "shares its health folder; give each its own name (renderfarm worker --name, celery -n)",
                      soft_wrap=True)  # fmt: skip
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    if not found:
        console.print("no worker answered (start one with `renderfarm worker`)")
        return
    from rich.table import Table

    table = Table("worker", "model", "engine", "queues", "status", "doing", "done")
    for w in found:
        doing = "; ".join(f"{r['id'][:8]} {r['progress']} {r['prompt']!r}" for r in w["active"]) or "-"
        table.add_row(w["worker"], w["model"] or "- (no render queue)", w["engine"] or "-", ",".join(w["queues"]),
                      w["status"], doing, str(w["processed"]))  # fmt: skip
    Console().print(table)


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="Port of Flower's UI and API.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 inside a container).")] = "127.0.0.1",
    db: Annotated[str | None, typer.Option(help="Keep Flower's task history in this file across restarts.")] = None,
) -> None:
    """Start Flower with this app loaded (send, follow and cancel renders), behind FLOWER_BASIC_AUTH."""
    from renderfarm.flower import flower_argv, run_flower

    raise typer.Exit(run_flower(flower_argv(port, address, db)))


@app.command("fetch-model")
def fetch_model() -> None:
    """Download MODEL_ID's weights (at MODEL_REVISION) into the cache before a worker starts."""
    from tasks.engines.weights import WeightsUnavailable, fetch
    from worker_config.settings import SettingsError, get_settings

    try:
        settings = get_settings()
    except SettingsError as exc:
        _fail(str(exc), 2)
    console.print(f"fetching {settings.MODEL_ID} ...")
    try:
        fetched = fetch(settings)
    except WeightsUnavailable as exc:
        _fail(str(exc))
    revision = f" at {fetched.revision}" if fetched.revision else ""
    size = fetched.size_bytes / 2**20
    shown = f"{size / 1024:.2f} GiB" if size >= 1024 else f"{size:.1f} MiB"
    console.print(f"{fetched.model}{revision}: {shown} in {fetched.path} ({fetched.seconds:.1f} s)")
    typer.echo(str(fetched.path))


@app.command("upload-image")
def upload_image(
    path: Annotated[Path, typer.Argument(help="A PNG, JPEG or WebP file.", exists=True, dir_okay=False)],
) -> None:
    """Check an image and store it in the farm's bucket (inputs/<sha256>.<ext>); print its s3:// URL for `image`."""
    from renderfarm.inputs import upload_image as upload
    from tasks.errors import StorageUnavailable
    from worker_config.settings import SettingsError

    try:
        url = upload(path)
    except SettingsError as exc:
        _fail(str(exc), 2)
    except ValueError as exc:
        _fail(f"{path}: {exc}", 2)
    except StorageUnavailable as exc:
        _fail(str(exc))
    typer.echo(url)


@app.command()
def api(
    port: Annotated[int, typer.Option(help="Port of the HTTP API.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 inside a container).")] = "127.0.0.1",
) -> None:
    """Serve the OpenAI-compatible videos API (/v1/videos) in front of the queue (API_KEYS_FILE required)."""
    try:
        from renderfarm.api.app import create_app
        from renderfarm.api.server import serve
        from renderfarm.api.settings import get_api_settings
    except ImportError as exc:
        _fail(f"the API needs its extra: pip install 'renderfarm[api]' ({exc})")
    try:
        settings = get_api_settings()
        application = create_app(settings)
    except ValueError as exc:  # invalid settings (SettingsError) or keys file
        _fail(str(exc), 2)
    import logging

    # One line per request (request id, method, path, status, time) from renderfarm.api; never a key.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(application, settings, host, port)


@app.command()
def api_key(name: Annotated[str, typer.Argument(help="Who the key is for (owns the videos it creates).")]) -> None:
    """Make a new API key: the key on the terminal (stderr, shown once), its line for API_KEYS_FILE on
    stdout, so `renderfarm api-key NAME >> api-keys` appends the line (only the key's hash is stored)."""
    from renderfarm.api.keys import new_key

    if not name.replace("-", "").replace("_", "").isalnum():
        _fail(f"name {name!r}: use letters, digits, - and _")
    key, line = new_key(name)
    console.print(f"key for {name} (shown once; give it to the client): {key}", soft_wrap=True, highlight=False)
    typer.echo(line)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the workers' answers.")] = 2.0,
) -> None:
    """The models the farm serves: each one's queue, workers and waiting requests (DEFAULT_MODEL marked)."""
    from renderfarm.fleet import models as survey_models
    from tasks import app as celery_app
    from worker_config.redis_link import redis_client
    from worker_config.settings import get_broker_settings

    broker = get_broker_settings()
    celery_app.conf.broker_connection_retry = False
    celery_app.conf.broker_connection_timeout = 5
    client = redis_client(broker, timeout_s=5, connect_timeout_s=5)
    try:
        rows = survey_models(celery_app, client, broker.DEFAULT_MODEL, timeout)
    except Exception as exc:  # noqa: BLE001
        _fail(
            _redis_trouble(exc, auth_only=True)
            or f"could not reach the broker at REDIS_URL: {type(exc).__name__}: {exc}"
        )
    finally:
        client.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no worker answered and no request is waiting")
        return
    from rich.table import Table

    table = Table("model", "queue", "workers", "waiting")
    for row in rows:
        model = row["model"] or "[red](no worker)[/]"
        table.add_row(f"{model}{' (default)' if row['default'] else ''}", ", ".join(row["queues"]),
                      str(row["workers"]), str(row["waiting"]))  # fmt: skip
    Console().print(table)  # stdout, as `renderfarm workers` prints its own


NAME_HELP = (
    "Node name before '@' (default: render-<model>, and -gpu<ids> on a GPU). With several GPU groups each gets "
    "-gpu<ids> appended."
)


@app.command()
def worker(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    name: Annotated[str | None, typer.Option(help=NAME_HELP)] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the worker command(s) as JSON instead of running them.")] = False,
) -> None:
    """Start a render worker for this machine: prefork, concurrency 1, one per GPU (group of NUM_GPUS)."""
    from renderfarm.launch import check_names, plan_workers, run_workers, visible_gpus
    from worker_config.settings import SettingsError, get_settings

    try:
        settings = get_settings()
    except SettingsError as exc:
        _fail(str(exc), 2)
    plans = plan_workers(settings, visible_gpus(settings), loglevel=loglevel, name=name)
    if dry_run:
        typer.echo(json.dumps([{"name": p.name, "argv": p.argv, "env": p.env} for p in plans], indent=2))
        return
    if taken := check_names(plans):
        _fail(
            f"a worker named {', '.join(taken)} is already running: two workers of one name hide each other "
            "(renderfarm workers, models) and share a health folder; start this one with another --name",
            2,
        )
    for plan in plans:
        gpus = plan.env.get("CUDA_VISIBLE_DEVICES")
        console.print(f"starting worker {plan.name} ({f'GPU {gpus}' if gpus else 'CPU'}): {' '.join(plan.argv[1:])}",
                      soft_wrap=True, highlight=False)  # fmt: skip
    raise typer.Exit(run_workers(plans))


@app.command()
def doctor(
    producer: Annotated[bool, typer.Option(help="Skip the worker checks (torch, /dev/shm, model).")] = False,
) -> None:
    """Check the broker, storage, webhooks and (for workers) torch/CUDA, /dev/shm, multiprocessing and the model."""
    from renderfarm.doctor import run_doctor
    from worker_config.settings import SettingsError, get_settings

    try:
        settings = get_settings()
    except SettingsError as exc:
        _fail(str(exc), 2)
    findings = run_doctor(settings, worker=not producer)
    for f in findings:
        mark = "[green]ok[/]  " if f.ok else "[bold red]FAIL[/]"
        console.print(f"{mark} {f.name}: {f.detail}", highlight=False, soft_wrap=True)
        if f.fix and not f.ok:
            console.print(f"     fix: {f.fix}", highlight=False, soft_wrap=True)
    failed = [f.name for f in findings if not f.ok]
    if failed:
        _fail(f"{len(failed)} check(s) failed: {', '.join(failed)}")
    console.print("all checks passed")


def main() -> None:
    from worker_config.settings import SettingsError

    try:
        app()
    except SettingsError as exc:  # raised where a command first reads the settings (importing the app)
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
