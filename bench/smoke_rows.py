"""The GPU smoke check's rows under a time limit: each row in a process of its own, killed with all it started.

A row that hangs (a worker that never becomes ready, a render that never ends) must not stop the
rows after it, nor eat a lent GPU's lease. ``run_rows`` runs each row's command in a new session
and waits at most ``row_timeout_s`` for it (less where the whole run's ``deadline`` comes first).
When the time is up the row's process and everything it started are killed: its descendants
(a worker in a session of its own included), and every process left in their sessions (orphans,
such as Ray's agents once their raylet is gone). They are all stopped first (SIGSTOP, until no new
one appears) and then killed, so none can start another in between.

A row's command writes its record (a JSON object with at least ``ok`` and ``outcome``) to the
path it is given, whole (a write and a rename), after each phase; the record of a row that timed out is the last one written,
its outcome "timed out after N s (... what it was doing)". Rows that the deadline leaves no time for
are reported "not run".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

__all__ = ["run_rows", "run_limited", "kill_everything_started_by", "MIN_ROW_S"]

MIN_ROW_S = 30.0  # a row is not started with less time than this left before the deadline


def run_rows(
    names: list[str],
    command_for: Callable[[str, Path], list[str]],
    results: Path,
    row_timeout_s: float,
    deadline: float | None = None,
    on_timeout: Callable[[str], None] | None = None,
    report: Callable[[str, dict[str, Any]], None] | None = None,
    cwd: Path | None = None,
) -> list[dict[str, Any]]:
    """Run ``command_for(name, record_path)`` for each row, in order; each row's record.

    ``deadline``: a ``time.monotonic()`` value no row may run past (``None``: none). ``on_timeout(name)``
    runs after a timed-out row's processes are gone (to clear what it left behind); ``report(name,
    record)`` after each row.
    """
    records: list[dict[str, Any]] = []
    results.mkdir(parents=True, exist_ok=True)
    for name in names:
        left = None if deadline is None else deadline - time.monotonic()
        limit = row_timeout_s if left is None else min(row_timeout_s, left)
        if left is not None and left < MIN_ROW_S:
            record = {"name": name, "ok": False, "outcome": "not run: the run's time budget was spent (--budget)"}
        else:
            path = results / f"{name}.json"
            record, timed_out = _run_row(name, command_for(name, path), path, limit, cwd)
            if timed_out and on_timeout is not None:
                on_timeout(name)
        records.append(record)
        if report is not None:
            report(name, record)
    return records


def _run_row(name: str, command: list[str], path: Path, limit: float, cwd: Path | None) -> tuple[dict[str, Any], bool]:
    """The row's record, and whether it timed out."""
    path.unlink(missing_ok=True)
    returncode, killed = run_limited(command, limit, cwd=cwd)
    record: dict[str, Any] = {"name": name, "ok": False, "outcome": "not started"}
    with contextlib.suppress(OSError, ValueError):  # none written yet (a row writes it whole: write, rename)
        record = json.loads(path.read_text())
    if returncode is None:
        doing = record.get("outcome", "")
        record["ok"] = False
        record["outcome"] = (f"timed out after {limit:.0f} s ({doing}); {killed} processes it had started were "
                             "killed")  # fmt: skip
    elif returncode != 0:
        record["ok"] = False
        record["outcome"] = f"FAILED: the row's process exited with {returncode} ({record.get('outcome', '')})"
    return record, returncode is None


def run_limited(command: list[str], timeout_s: float, **popen: Any) -> tuple[int | None, int]:
    """Run ``command`` in a new session for at most ``timeout_s``: (its exit status, or ``None`` if it was
    killed when its time was up; how many processes were killed)."""
    proc = subprocess.Popen(command, start_new_session=True, **popen)
    try:
        return proc.wait(timeout_s), 0
    except subprocess.TimeoutExpired:
        killed = kill_everything_started_by(proc.pid)
        proc.wait()
        return None, killed


def kill_everything_started_by(pid: int) -> int:
    """SIGKILL ``pid``, its descendants and every process in their sessions; how many were killed."""
    stopped: dict[int, psutil.Process] = {}
    while True:
        found = _tree(pid, stopped)
        new = [p for p in found if p.pid not in stopped]
        if not new:
            break
        for proc in new:
            stopped[proc.pid] = proc
            _signal(proc, signal.SIGSTOP)  # stopped processes start nothing new while the rest are found
    for proc in stopped.values():
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(list(stopped.values()), timeout=30)
    return len(stopped)


def _tree(pid: int, known: dict[int, psutil.Process]) -> list[psutil.Process]:
    """``pid``, its descendants, and the processes of their sessions (what is already known included)."""
    found: dict[int, psutil.Process] = dict(known)
    for root in [pid, *known]:
        try:
            proc = psutil.Process(root)
            found[proc.pid] = proc
            found.update((child.pid, child) for child in proc.children(recursive=True))
        except psutil.Error:
            continue
    sessions = {_session(p) for p in found.values()} - {None, os.getsid(0)}  # never this process's own session
    for proc in psutil.process_iter():
        if proc.pid not in found and _session(proc) in sessions:
            found[proc.pid] = proc
    return [p for p in found.values() if p.pid != os.getpid()]


def _session(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except OSError:
        return None


def _signal(proc: psutil.Process, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except psutil.Error:
        pass
