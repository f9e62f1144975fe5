"""``python -m bench.statements`` run small against a private PostgreSQL: the four setups (standalone and
multihost, prepared and plain) each end every task, and the figures are there (never asserted)."""

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
def test_statements_bench_runs_the_four_setups(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "bench.statements", "--tasks", "600", "--keys", "40",
                           "--repeats", "1", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"bench.statements exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "multihost: prepared / plain" in proc.stdout
    data: dict[str, Any] = json.loads((tmp_path / "statements.json").read_text())
    assert {s["setup"] for s in data["summary"]} == {"standalone, prepared", "multihost, prepared",
                                                     "standalone, plain", "multihost, plain"}
    for run in data["runs"]:
        assert run["finished"] == 600, run  # every task claimed, started and ended through the store
        assert run["statements"]["start"] == run["statements"]["end"] >= 600 // 32
    assert all(s["vs_standalone_prepared"] is not None for s in data["summary"])
