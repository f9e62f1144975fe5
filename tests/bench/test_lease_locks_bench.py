"""``python -m bench.lease_locks`` run short: the statements that lock partition lease rows, run against each
other, never deadlock (every one locks in partition order; before that, 17 deadlocks in 12 s)."""

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
def test_the_lease_statements_never_deadlock(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "bench.lease_locks", "--seconds", "3", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"bench.lease_locks exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    data: dict[str, Any] = json.loads((tmp_path / "lease_locks.json").read_text())
    assert data["errors"] == []
    assert set(data["statements_by_role"]) == {"shard 1", "shard 2", "shard 3", "joiner", "holder"}
    assert data["deadlocks"] == 0, data["deadlocks_by_role"]
