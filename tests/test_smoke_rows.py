"""The GPU smoke check's time limit per row (``bench.smoke_rows``), on small real processes.

A row that hangs is killed with everything it started (a process in a session of its own, and an
orphan left in that session) and reported "timed out after N s" with what it was doing; the next
row still runs; a row the run's budget leaves no time for is reported "not run". No model, no
worker: the rows here are a few lines of Python each, so this runs in seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil

from bench.smoke_rows import run_rows
from tests.support import wait_for

# A row that hangs the way a worker does: it starts a session leader (the worker, in a session of its
# own), whose child starts a grandchild and exits (Ray's agents, orphaned); it says what it is doing, and waits.
LEADER = """
import subprocess, sys, time
sleeper = "[sys.executable, '-c', 'import time; time.sleep(600)']"
middle = f"import subprocess as s, sys; print(s.Popen({sleeper}, stdout=s.DEVNULL, stderr=s.DEVNULL).pid)"
orphan = subprocess.run([sys.executable, "-c", middle], capture_output=True, text=True, check=True).stdout.strip()
open(sys.argv[1], "a").write(orphan + "\\n")
time.sleep(600)
"""
HANGS = """
import json, os, subprocess, sys, time
record, pids, leader_script = sys.argv[1:4]
leader = subprocess.Popen([sys.executable, leader_script, pids], start_new_session=True)
while not open(pids).read().split():
    time.sleep(0.05)
open(pids, "a").write(f"{leader.pid}\\n")
open(record + ".part", "w").write(json.dumps({"name": "hangs", "ok": False, "outcome": "starting the worker"}))
os.rename(record + ".part", record)
time.sleep(600)
"""
WORKS = """
import json, os, sys
open(sys.argv[1] + ".part", "w").write(json.dumps({"name": "works", "ok": True, "outcome": "rendered", "load_s": 1.5}))
os.rename(sys.argv[1] + ".part", sys.argv[1])
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_row_that_hangs_is_killed_with_all_it_started_and_reported_and_the_next_row_runs(tmp_path: Path):
    pids, leader = tmp_path / "pids", tmp_path / "leader.py"
    pids.write_text("")
    leader.write_text(LEADER)
    timed_out: list[str] = []

    def command_for(name: str, record: Path) -> list[str]:
        script = HANGS if name == "hangs" else WORKS
        return [sys.executable, "-c", script, str(record), str(pids), str(leader)]

    records = run_rows(["hangs", "works"], command_for, tmp_path / "rows", row_timeout_s=5, on_timeout=timed_out.append)

    hung, worked = records
    assert hung["ok"] is False
    assert hung["outcome"].startswith("timed out after 5 s (starting the worker); ")
    assert timed_out == ["hangs"]  # the caller cleared what the killed row left behind, once
    assert worked == {"name": "works", "ok": True, "outcome": "rendered", "load_s": 1.5}
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 2  # the orphan and the session leader
    wait_for(lambda: all(gone(pid) for pid in started), 30, "every process the hung row started to be gone")
    killed = int(hung["outcome"].split("; ")[1].split()[0])
    assert killed >= 3  # the row, the leader and the orphan (the killed count includes each of them)


def test_rows_the_budget_leaves_no_time_for_are_reported_not_run(tmp_path: Path):
    def command_for(name: str, record: Path) -> list[str]:
        return [sys.executable, "-c", WORKS, str(record)]

    records = run_rows(["works"], command_for, tmp_path / "rows", row_timeout_s=300, deadline=time.monotonic() + 5)
    assert records == [{"name": "works", "ok": False, "outcome": "not run: the run's time budget was spent (--budget)"}]
    assert not (tmp_path / "rows" / "works.json").exists()
    assert json.dumps(records)  # a record is plain JSON, as results.json holds it
