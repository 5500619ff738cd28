"""Health probes of this host's worker: readiness (the default), liveness and start-up.

``--probe ready``: ``python -m tasks.worker.healthcheck [--name render] [--timeout 5]`` exits 0 when the worker
``<name>@<this host>`` answers over Celery's control API *and* its pool child has finished
``worker_process_init`` (where ``tasks.worker.lifecycle`` loads the engine); 1 otherwise: no
answer, broker down, invalid settings, or the model still loading.

A plain ``control.ping`` is not enough: the main process answers it as soon as it consumes, while
the pool child may still be loading the model. So this asks for the worker's ``stats``: a prefork
child is counted in ``pool.writes.inqueues.total`` only after it sent its "up" message, which it
sends once its initializer (worker_process_init, the model load) returned. With ``--pool=solo``
the load runs in the main process before it consumes, so any answer means loaded. A worker whose
load fails stops itself and never answers.

``--probe live`` and ``--probe startup`` read only local files the worker writes
(``tasks.worker.vitals``), never Redis, so a Redis outage never fails them: ``live`` passes while
the worker's main process beats (its heartbeat is at most ``STALE_S`` old), ``startup`` once a pool
process of it has loaded its model. Orchestrators restart on liveness and hold liveness back until
start-up passed (Kubernetes, Salad); readiness only says whether the worker can take work now.

The worker must run under the node name ``<name>@%h`` (compose/worker-entrypoint.sh uses
``render@%h``; Celery's ``%h`` is ``socket.gethostname()``). Imports no torch.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from typing import Any

from tasks.worker.vitals import STALE_S, alive, node_dir, started
from worker_config.settings import get_settings

__all__ = ["DEFAULT_NAME", "INTERNALS", "build_parser", "engine_loaded", "main", "node_name", "worker_stats"]

# Celery's internals this relies on (checked by tests/test_internals.py against the pinned versions):
# the prefork pool's `stats` reply counts the pool processes that took a task queue (`writes.inqueues`).
INTERNALS = ("celery.concurrency.asynpool.AsynPool.human_write_stats",)

DEFAULT_NAME = "render"


def node_name(name: str = DEFAULT_NAME, hostname: str | None = None) -> str:
    """The Celery node name of the worker ``name`` on this host (``name@hostname``)."""
    return f"{name}@{hostname or socket.gethostname()}"


def worker_stats(node: str, timeout: float) -> dict[str, Any] | None:
    """The ``stats`` reply of the worker ``node``, or None if it did not answer within ``timeout``."""
    from tasks.celery import app

    # Fail fast when the broker is down instead of retrying for minutes.
    app.conf.broker_connection_timeout = timeout
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_max_retries = 1
    try:
        replies = app.control.inspect(destination=[node], timeout=timeout).stats() or {}
    finally:
        app.close()
    return replies.get(node)


def engine_loaded(stats: dict[str, Any]) -> tuple[bool, str]:
    """(loaded?, why) from a worker's ``stats`` reply."""
    pool = stats.get("pool") or {}
    processes = pool.get("processes") or []
    writes = pool.get("writes")
    if not isinstance(writes, dict):  # solo/threads: the engine loads before the worker consumes
        return True, f"{pool.get('implementation', 'pool')} worker answers"
    up = int(writes.get("inqueues", {}).get("total", 0))
    if up < 1:
        return False, f"pool processes {processes} still loading the model (worker_process_init)"
    return True, f"{up} of {len(processes)} pool process(es) loaded the model"


def build_parser() -> argparse.ArgumentParser:
    """The probe's command line (tests/test_kubernetes.py parses the manifests' probes with it)."""
    parser = argparse.ArgumentParser(
        prog="python -m tasks.worker.healthcheck",
        description="Exit 0 only if this host's render worker answers and its model is loaded.",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help="worker name before '@' (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default: 5)")
    parser.add_argument(
        "--probe", choices=("ready", "live", "startup"), default="ready",
        help="ready: answers over Redis with its model loaded (default); live: its main process beats "
        "(no Redis); startup: a pool process loaded the model (no Redis)",
    )  # fmt: skip
    parser.add_argument(
        "--max-age", type=float, default=STALE_S,
        help="live: the oldest heartbeat that still passes, in seconds (default: %(default)s)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    node = node_name(args.name)
    if args.probe != "ready":
        try:
            directory = node_dir(get_settings().HEALTH_DIR, node)
        except Exception as exc:  # noqa: BLE001 - invalid settings: the worker cannot run either
            print(f"unhealthy: {node}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        ok, why = alive(directory, args.max_age) if args.probe == "live" else started(directory)
        print(
            f"{'healthy' if ok else 'unhealthy'} ({args.probe}): {node}: {why}", file=sys.stdout if ok else sys.stderr
        )
        return 0 if ok else 1
    try:
        stats = worker_stats(node, args.timeout)
    except Exception as exc:  # noqa: BLE001 - any failure (settings, broker) means unhealthy
        print(f"unhealthy: {node}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if stats is None:
        print(f"unhealthy: {node} did not answer within {args.timeout:g}s", file=sys.stderr)
        return 1
    loaded, why = engine_loaded(stats)
    print(f"{'healthy' if loaded else 'unhealthy'}: {node}: {why}", file=sys.stdout if loaded else sys.stderr)
    return 0 if loaded else 1


if __name__ == "__main__":
    sys.exit(main())
