"""bench.multihost draws its scaling curve (throughput and transactions per task over the setups)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.multihost.output import plot_scaling


def _results(summary: list[dict]) -> dict:
    return {"scaling": {"workload": {"description": "5,000 no-op tasks over 500 keys"}, "shards_per_instance": 2,
                        "summary": summary}}


def test_the_scaling_plot_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    summary = [{"setup": "standalone", "mode": "standalone", "throughput_tps": 5000.0, "db_transactions_per_task": 0.1},
               {"setup": "1 instance", "mode": "multihost", "throughput_tps": 3000.0, "db_transactions_per_task": 0.3},
               {"setup": "3 instances", "mode": "multihost", "throughput_tps": 3500.0,
                "db_transactions_per_task": 0.4}]
    path = plot_scaling(_results(summary), tmp_path / "scaling.png")
    assert path is not None and path.read_bytes().startswith(b"\x89PNG")


def test_the_scaling_plot_draws_both_routings(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    summary = [{"setup": f"{label}, {routing}", "mode": mode, "instances": n, "routing": routing,
                "throughput_tps": tps, "taskomatic_cpu_s_per_1k": 0.06, "postgres_cpu_s_per_1k": 0.08}
               for routing in ("pinned", "hash")
               for label, mode, n, tps in (("standalone", "standalone", 1, 9000.0), ("1 multihost", "multihost", 1,
                                                                                  8000.0))]
    path = plot_scaling(_results(summary), tmp_path / "scaling.png")
    assert path is not None and path.read_bytes().startswith(b"\x89PNG")


def test_no_plot_without_scaling_runs(tmp_path: Path) -> None:
    assert plot_scaling({"takeover": {}}, tmp_path / "x.png") is None
    assert plot_scaling(_results([]), tmp_path / "y.png") is None
    assert not list(tmp_path.iterdir())
