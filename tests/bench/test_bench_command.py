"""``taskomatic bench``: the installed command runs the suite against a server given by --dsn without
touching what is there (its own uniquely named databases, dropped at the end), writes its report
directory, and says what to install when the bench is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg2

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKOMATIC_", "PG"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def _snapshot(dsn: str) -> tuple[list[Any], list[str]]:
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT id, action, state, task_target_id, created_at, time_started, time_ended, message "
                    "FROM tasks ORDER BY id")
        rows = cur.fetchall()
        cur.execute("SELECT datname FROM pg_database ORDER BY datname")
        databases = [r[0] for r in cur.fetchall()]
    conn.close()
    return rows, databases


def test_bench_on_a_given_server_leaves_its_tasks_table_alone(dsn: str, tmp_path: Path) -> None:
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:  # somebody's fleet: queued work the bench's daemons must never run
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action) "
                    "SELECT 'Vm', g, 'noop' FROM generate_series(1, 25) g")
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action, state, message, time_ended) "
                    "VALUES ('Vm', 7, 'start_vm', 'failed', 'no host', clock_timestamp())")
    conn.commit()
    conn.close()
    before = _snapshot(dsn)
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "taskomatic", "bench", "--smoke", "--only", "noop-uniform",
                           "--dsn", dsn, "--out", str(out), "--no-progress", "--no-plots"],
                          capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=240, check=False)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    assert _snapshot(dsn) == before  # the same rows, and every database it made is gone
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.md").read_text().startswith("#")
    assert results["suite"] == "smoke" and results["checks"]["all_runs_complete"]
    assert "given by --dsn" in results["postgresql_server"]
    assert {r["workload"] for r in results["runs"]} == {"noop-uniform"}
    assert all(r["tasks"]["finished"] == 200 for r in results["runs"])


def test_bench_without_the_bench_modules_says_what_to_install(tmp_path: Path) -> None:
    # As on a machine with the taskomatic package but not taskomatic-bench: `bench` cannot be imported.
    probe = "import sys; sys.modules['bench'] = None; from taskomatic.cli import main; sys.exit(main(['bench']))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(),
                          cwd=str(tmp_path), timeout=60, check=False)
    assert proc.returncode == 1
    assert "install the taskomatic-bench package" in proc.stderr.lower()
    assert "dnf install taskomatic-bench" in proc.stderr
    assert not list(tmp_path.iterdir())  # no report directory started
