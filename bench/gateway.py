"""What the HTTP gateway adds per render: ``python -m bench.gateway`` (part of ``make bench``; issue 18).

On a local stack (real redis-server, S3 endpoint, one real worker serving tiny-wan, and
``renderfarm api`` as a subprocess), the same small render (tiny-wan's defaults: 64x64, 9 frames,
4 steps; a new prompt each time, so nothing is served from storage) is done one at a time,
alternating between:
  delay     - ``render.delay(...).get()``: the Celery round trip;
  sdk       - the official ``openai`` SDK's ``videos.create_and_poll``, pacing its polls by the
              gateway's ``openai-poll-after-ms`` (500 ms);
  sdk-50ms  - the same polling every 50 ms.
Each figure is the time from the call to the finished video, median and p90 over ``--renders``;
the gateway's overhead is a column minus ``delay``. Printed and written to docs/benchmarks.md
between its ``gateway`` markers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.stack import local_stack, machine, pct, replace_section
from renderfarm.api.keys import new_key
from renderfarm.localstack import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, default=30)
    args = parser.parse_args()

    with local_stack() as stack:
        from openai import OpenAI

        from tasks.engines.tiny_wan import ensure_tiny_wan

        cache = stack.workdir / "models"
        ensure_tiny_wan(cache)
        os.environ.update(MODEL_CACHE_DIR=str(cache), DEFAULT_MODEL="tiny-wan")
        stack.worker("gateway-bench")
        key, line = new_key("bench")
        keys = Path(tempfile.mkstemp(prefix="renderfarm-keys-")[1])
        keys.write_text(line + "\n")
        port = free_port()
        env = {**os.environ, "API_KEYS_FILE": str(keys), "API_RATE_LIMIT_PER_MIN": "0", "API_MAX_ACTIVE": "0"}
        api = subprocess.Popen([sys.executable, "-m", "renderfarm.cli", "api", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks the videos API deprecated
            client = OpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
            wait_for(lambda: _answers(client), 60, "the API to answer")
            from tasks import render

            systems = {
                "delay": lambda p: render.delay(prompt=p).get(timeout=120),
                "sdk": lambda p: _completed(client.videos.create_and_poll(prompt=p)),
                "sdk-50ms": lambda p: _completed(client.videos.create_and_poll(prompt=p, poll_interval_ms=50)),
            }
            for name, call in systems.items():  # warm-up: first connections, first render
                call(f"warm-up {name}")
            times: dict[str, list[float]] = {name: [] for name in systems}
            for i in range(args.renders):
                for name, call in systems.items():
                    started = time.perf_counter()
                    call(f"{name} render {i}")
                    times[name].append(time.perf_counter() - started)
        finally:
            api.terminate()
            api.wait(20)
            keys.unlink()

    m = machine()
    base = statistics.median(times["delay"])
    rows = [f"| `{name}` | {statistics.median(t) * 1000:.0f} ms | {pct(t, 90) * 1000:.0f} ms | "
            f"{(statistics.median(t) - base) * 1000:+.0f} ms |" for name, t in times.items()]  # fmt: skip
    body = (
        f"Measured {time.strftime('%Y-%m-%d')} on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, one worker, "
        f"{args.renders} renders per system one at a time, alternating (`python -m bench.gateway`).\n\n"
        "| system | median, call to finished video | p90 | gateway overhead (median minus `delay`) |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "The SDK's own polling waits `openai-poll-after-ms` (500 ms) between looks, so it sees a render finished up "
        "to one poll late (here always one: these renders take less than a poll; a GPU render of seconds loses "
        "half a poll on average). Polling every 50 ms shows what the HTTP hop itself costs.\n"
    )
    print(body)
    replace_section(ROOT / "docs" / "benchmarks.md", "gateway", body)


def _answers(client) -> bool:  # type: ignore[no-untyped-def]
    try:
        client.videos.list(limit=1)
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _completed(video) -> None:  # type: ignore[no-untyped-def]
    if video.status != "completed":
        raise RuntimeError(f"video {video.id} ended {video.status}: {video.error}")


if __name__ == "__main__":
    main()
