"""A search killed with SIGKILL mid-study resumes: finished trials are kept as they were (not re-run), the
trial that was running is marked interrupted and its params run again, and the budget is met exactly."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from test_search import tiny_space

from harness.search.space import parse_search
from harness.search.study import run_search

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


def states(db: Path) -> dict[int, str]:
    """Trial number -> state; a running trial whose run has started (its config is stored) reads RUNNING+RUN."""
    if not db.is_file():
        return {}
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            found = dict(connection.execute("SELECT number, state FROM trials").fetchall())
            started = connection.execute("SELECT t.number FROM trials t JOIN trial_user_attributes a ON "
                                         "a.trial_id = t.trial_id WHERE a.key = 'config'").fetchall()
    except sqlite3.OperationalError:  # the tables are not created yet
        return {}
    return {n: s + "+RUN" if s == "RUNNING" and (n,) in started else s for n, s in found.items()}


def test_search_resumes_after_kill_9_without_repeating_finished_trials(tmp_path):
    space = tiny_space(tmp_path / "runs", budget={"trials": 4}, start_with=[], sampler={"name": "random", "seed": 5})
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(space))
    directory = tmp_path / "runs/searches/tiny__none"
    db = directory / "study.db"
    process = subprocess.Popen([sys.executable, "-m", "harness.cli", "search", str(path)], cwd=REPO,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not ("COMPLETE" in states(db).values() and "RUNNING+RUN" in states(db).values()):
            assert process.poll() is None, "the search ended before it could be killed mid-study"
            assert time.monotonic() < deadline, f"no trial finished in time: {states(db)}"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    killed = states(db)
    finished = [n for n, s in killed.items() if s == "COMPLETE"]
    interrupted = [n for n, s in killed.items() if s == "RUNNING+RUN"]
    assert finished and interrupted and len(finished) < 4
    before = json.loads((directory / "search.json").read_text())  # written after each finished trial
    kept = {t["number"]: t for t in before["trials"] if t["number"] in finished}
    mtimes = {n: (directory / t["run_dir"] / "results.json").stat().st_mtime_ns for n, t in kept.items()}

    run_search(parse_search(space), Console(quiet=True))

    after = json.loads((directory / "search.json").read_text())
    by_number = {t["number"]: t for t in after["trials"]}
    for number, trial in kept.items():  # finished trials: the same record, their run not written again
        assert by_number[number] == trial
        assert (directory / trial["run_dir"] / "results.json").stat().st_mtime_ns == mtimes[number]
    for number in interrupted:
        assert by_number[number]["status"] == "interrupted"
        (retry,) = [t for t in after["trials"] if t.get("retry_of") == number]
        assert retry["status"] in ("feasible", "infeasible") and retry["params"] == by_number[number]["params"]
    done = [t for t in after["trials"] if t["status"] in ("feasible", "infeasible", "failed")]
    assert len(done) == 4 == after["spent"]["trials"] and after["finished"]
    keys = [(t["attack"], json.dumps(t["params"], sort_keys=True)) for t in done]
    assert len(set(keys)) == len(keys)  # no finished trial was repeated
    assert set(states(db).values()) <= {"COMPLETE", "FAIL"}  # nothing left running
