"""``python -m bench.process_cpu`` run small against a private PostgreSQL: every daemon process is listed with
its figures, and they add up (their values are never asserted: they are the machine's)."""

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
def test_process_cpu_bench_splits_the_daemon_by_process(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "process_cpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.process_cpu", "--tasks", "60", "--keys", "12", "--ms", "2",
                           "--shards", "2", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["settings"] == {"tasks": 60, "keys": 12, "ms": 2.0, "shards": 2, "routing": "pinned"}
    assert data["wait_cost"]["sleep_20ms_us"] > 0 and data["wait_cost"]["sleep_2ms_us"] > 0
    [run] = data["runs"]
    roles = {p["role"] for p in run["processes"]}
    assert {"supervisor", "fetcher", "reconciler", "shard 0", "shard 1"} <= roles, roles  # and the fork server
    shards = [p for p in run["processes"] if p["role"].startswith("shard ")]
    # Every shard ran tasks: each waited (voluntary switches) for something.
    assert all(p["voluntary_switches_per_task"] > 0 for p in shards)
    assert run["daemon_on_cpu_ms_per_task"] == pytest.approx(
        sum(p["on_cpu_ms_per_task"] for p in run["processes"]), abs=0.001)
    assert "daemon" in proc.stdout and "ms/task" in proc.stdout
