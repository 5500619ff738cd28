"""Let a Celery prefork pool child start ``multiprocessing`` children (FastVideo's mp executor).

Three things stop a ``spawn`` process from starting inside a prefork pool child (FIELD_NOTES.md):

1. Pool children are daemonic, and ``multiprocessing`` refuses children of daemonic processes
   ("daemonic processes are not allowed to have children"): the flag is cleared.
2. billiard installs its own process object as ``multiprocessing``'s current process, with a
   billiard ``AuthenticationString`` authkey that refuses to be pickled by ``multiprocessing``'s
   spawn ("Pickling an AuthenticationString object is disallowed"): it is replaced with
   ``multiprocessing``'s own ``AuthenticationString`` of the same bytes.
3. A spawned child must import the module that defines its target: the project root goes on
   ``PYTHONPATH`` (inherited by every spawned interpreter).

Orphans are handled where the children start (``tasks.engines.fastvideo_worker``): they die
with the pool child that spawned them.
"""

from __future__ import annotations

import multiprocessing.process
import os
from pathlib import Path

__all__ = ["allow_children_in_pool_process", "INTERNALS", "PROJECT_ROOT"]

# billiard's internals this relies on (checked by tests/test_internals.py against the pinned versions).
INTERNALS = (
    "billiard.process._set_current_process",  # billiard's process becomes multiprocessing's current one
    "billiard.process._current_process._config",  # ... with its daemon flag and authkey here
    "billiard.process.AuthenticationString",  # ... an authkey multiprocessing refuses to pickle
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # tasks/worker/mp_in_pool.py


def allow_children_in_pool_process() -> None:
    """Apply the three fixes to this process (idempotent; harmless outside a pool child)."""
    current = multiprocessing.process.current_process()
    config = current._config  # type: ignore[attr-defined]  # both billiard's and multiprocessing's keep it here
    config["daemon"] = False
    authkey = config.get("authkey")
    stdlib_authkey = multiprocessing.process.AuthenticationString  # type: ignore[attr-defined]  # untyped in typeshed
    if authkey is not None and not isinstance(authkey, stdlib_authkey):
        config["authkey"] = stdlib_authkey(bytes(authkey))

    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PROJECT_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *paths])
