"""``renderfarm flower``: Flower with this project's app loaded, behind basic auth.

Loaded with the app (``celery -A tasks flower``), Flower knows ``tasks.render`` (its
``/api/task/async-apply/tasks.render`` sends renders) and the result backend (its
``/api/task/result/ID`` answers). Compose runs Flower the same way.

Flower rebuilds task states from events with Celery's state precedence, where a custom state such
as this project's ``PROGRESS`` ranks with the final states and above ``REVOKED``: a cancelled
render stayed ``PROGRESS`` there for ever. ``progress_ranks_below_final_states`` places
``PROGRESS`` after ``REVOKED`` and before ``STARTED``, in this process only (it is what Flower
reads). Listed in ``INTERNALS`` and checked by tests/test_internals.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["INTERNALS", "flower_argv", "progress_ranks_below_final_states", "run_flower", "tls_for_flowers_own_client"]

INTERNALS = ("celery.states.PRECEDENCE_LOOKUP",)  # the ranks celery.events.state merges task events by


def progress_ranks_below_final_states() -> None:
    from celery import states

    from tasks.pipeline.progress import PROGRESS

    lookup = states.PRECEDENCE_LOOKUP
    lookup[PROGRESS] = (lookup[states.REVOKED] + lookup[states.STARTED]) / 2


def tls_for_flowers_own_client() -> None:
    """Flower reads queue lengths with a Redis client of its own, built from the broker's host and
    ``broker_use_ssl`` only: with ``rediss://`` it would ignore the URL's CA and fail (HTTP 500).
    Give it the URL's TLS options (tests/test_tls.py)."""
    from tasks import app
    from worker_config.redis_link import ssl_options

    options = ssl_options(app.conf.broker_url or "")
    if options and not app.conf.broker_use_ssl:
        app.conf.broker_use_ssl = options


def flower_argv(port: int, address: str, db: str | None) -> list[str]:
    """The Celery command line of Flower for this app (the password stays in the environment)."""
    argv = ["-A", "tasks", "flower", f"--port={port}", f"--address={address}"]
    if db:
        argv += ["--persistent=True", f"--db={db}"]
    return argv


def run_flower(argv: Sequence[str]) -> int:
    """Run Flower in this process, refusing to start without ``FLOWER_BASIC_AUTH``."""
    if not os.environ.get("FLOWER_BASIC_AUTH"):
        raise SystemExit(
            "renderfarm flower: set FLOWER_BASIC_AUTH=user:password (Flower's UI and API can send, "
            "cancel and read every render; they never run without a password here)"
        )
    progress_ranks_below_final_states()
    tls_for_flowers_own_client()
    from celery.bin.celery import celery

    # Celery's own entry point (`celery ...`), with the arguments given instead of sys.argv.
    return int(celery.main(args=list(argv), prog_name="celery", auto_envvar_prefix="CELERY") or 0)
