"""``python -m bench.history`` run small against a private PostgreSQL: every run completes, the history is
in the full table and not in the empty one, the figures are there (their values are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_history_bench_runs_both_tables(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "bench.history", "--rows", "5000", "--tasks", "300", "--keys",
                           "30", "--shards", "2", "--repeats", "1", "--statements", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"bench.history exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "5,000 rows / empty" in proc.stdout
    data: dict[str, Any] = json.loads((tmp_path / "history.json").read_text())
    runs = {run["history_rows"]: run for run in data["runs"]}
    assert set(runs) == {0, 5000}
    for rows, run in runs.items():
        assert run["complete"] and run["finished"] == 300 and run["order_violations"] == 0
        assert run["history"]["last_history_id"] == rows
        assert run["throughput_tps"] > 0
        # CPU is read in clock ticks (10 ms): 300 no-ops can cost PostgreSQL less than one tick.
        assert isinstance(run["cpu"]["postgres_s_per_1k"], (int, float)) and run["cpu"]["postgres_s_per_1k"] >= 0
        assert run["updates"]["updates"] >= 3 * 300  # claim, start, end of every task
        assert any("tasks" in s["query"] for s in run["statements"])
        roles = {p["role"] for p in run["processes"]}
        assert {"supervisor", "fetcher", "shard 0", "shard 1"} <= roles, roles
    assert runs[5000]["sizes_before_mb"]["tasks"] > runs[0]["sizes_before_mb"]["tasks"]
    assert data["summary"]["5000"]["ratio_to_empty"] is not None
