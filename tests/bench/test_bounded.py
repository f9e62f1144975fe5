"""The bounded-instance benchmark (``bench/bounded.py``): its verdicts on synthetic series, and a small
real run (private PostgreSQL, the real daemon with 4 shards) whose JSON must have every role's samples
and a held maximum within the claim capacity. Its figures are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import bounded_memory, bounded_report

REPO = Path(__file__).resolve().parents[2]


# -- levels_off -------------------------------------------------------------------------------


def test_flat_memory_levels_off() -> None:
    series = [(float(t), 40_000.0) for t in range(20)]
    verdict = bounded_report.levels_off(series)
    assert verdict["levels_off"] is True
    assert verdict["growth_kb"] == 0


def test_startup_ramp_then_flat_levels_off() -> None:
    # A spawned child grows from 10 MB to 41 MB while it imports, then stays: all growth in the first half.
    series = [(0.0, 10_000.0), (1.0, 30_000.0), (2.0, 41_000.0)] + [(float(t), 41_000.0) for t in range(3, 20)]
    assert bounded_report.levels_off(series)["levels_off"] is True


def test_steady_growth_does_not_level_off() -> None:
    series = [(float(t), 40_000.0 + 500.0 * t) for t in range(20)]  # +10 MB over the run
    verdict = bounded_report.levels_off(series)
    assert verdict["levels_off"] is False
    assert verdict["growth_kb"] == pytest.approx(500.0 * 19 - 500.0 * 9)


def test_growth_within_the_allowance() -> None:
    # 2 MB absolute allowance on a small process; 5 % on a big one.
    small = [(float(t), 20_000.0) for t in range(10)] + [(float(t), 21_900.0) for t in range(10, 20)]
    assert bounded_report.levels_off(small)["levels_off"] is True
    small_over = [(float(t), 20_000.0) for t in range(10)] + [(float(t), 22_100.0) for t in range(10, 20)]
    assert bounded_report.levels_off(small_over)["levels_off"] is False
    big = [(float(t), 100_000.0) for t in range(10)] + [(float(t), 104_900.0) for t in range(10, 20)]
    assert bounded_report.levels_off(big)["levels_off"] is True
    assert bounded_report.levels_off(big, rel=0.01)["levels_off"] is False


def test_shrinking_memory_levels_off_and_too_few_samples_are_undecided() -> None:
    assert bounded_report.levels_off([(float(t), 50_000.0 - 100.0 * t) for t in range(10)])["levels_off"] is True
    assert bounded_report.levels_off([(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)])["levels_off"] is None


# -- held_bounded -----------------------------------------------------------------------------


def test_held_within_capacity() -> None:
    verdict = bounded_report.held_bounded([0, 200, 1800, 2000, 1500, 0], capacity=2000)
    assert verdict == {"held_max": 2000, "capacity": 2000, "bounded": True, "held_max_share": 1.0}


def test_held_over_capacity_and_empty() -> None:
    assert bounded_report.held_bounded([0, 2001, 100], capacity=2000)["bounded"] is False
    assert bounded_report.held_bounded([], capacity=2000)["bounded"] is False


# -- throughput ---------------------------------------------------------------------------------


def test_window_rates() -> None:
    samples = [(float(t), 1000 * t) for t in range(11)]  # 1,000 tasks/s
    windows = bounded_report.window_rates(samples, 2.0)
    assert [w[2] for w in windows] == [1000.0] * 5
    assert windows[0][:2] == [0.0, 2.0] and windows[-1][1] == 10.0
    assert bounded_report.window_rates(samples[:1], 2.0) == []


def test_trend_steady_rate_does_not_slow_down() -> None:
    # 1,000/s with 10,000 unclaimed at the start, drained by t = 10.
    samples = [(float(t), 1000 * t, max(0, 9000 - 1000 * t)) for t in range(12)]
    trend = bounded_report.throughput_trend(samples)
    assert trend["slows_down"] is False
    assert trend["last_to_first"] == pytest.approx(1.0)


def test_trend_halving_rate_slows_down() -> None:
    ended, samples = 0, []
    for t in range(13):
        samples.append((float(t), ended, 100_000 - ended))
        ended += 2000 if t < 6 else 1000
    trend = bounded_report.throughput_trend(samples)
    assert trend["slows_down"] is True
    assert trend["last_to_first"] == pytest.approx(0.5)


def test_trend_undecided_without_a_claiming_period() -> None:
    assert bounded_report.throughput_trend([(0.0, 0, 0), (1.0, 100, 0)])["slows_down"] is None
    assert bounded_report.throughput_trend([(float(t), 10 * t, 5) for t in range(3)])["slows_down"] is None


def test_roles_from_titles() -> None:
    assert bounded_memory.role_of(10, 10, "python -m taskomatic --config x") == "supervisor"
    assert bounded_memory.role_of(11, 10, "taskomatic: shard 3/4") == "shard 3"
    assert bounded_memory.role_of(12, 10, "taskomatic: fetcher (4 shards)") == "fetcher"
    assert bounded_memory.role_of(13, 10, "taskomatic: reconciler") == "reconciler"
    assert not bounded_memory.is_titled(14, 10, "/usr/bin/python -B -c from multiprocess.spawn import spawn_main")
    assert bounded_memory.by_role({11: [1, 2, 3], 14: [4, 5, 6]}, {11: "shard 0"}) == {
        "shard 0": [1, 2, 3], "untitled pid 14": [4, 5, 6]}


# -- a small real run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bounded")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # subprocess.run kills the bench on timeout; the bench stops its daemon and PostgreSQL itself
    # (finally blocks, also on SIGTERM), each in a process group of its own.
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bounded", "--tasks", "8000", "--keys", "400", "--interval", "0.25",
         "--timeout", "90", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 0, f"bench exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    results: dict[str, Any] = json.loads((out / "bounded.json").read_text())
    results["_out"] = str(out)
    results["_stdout"] = proc.stdout
    return results


@pytest.mark.slow
def test_small_run_has_samples_for_every_role(small_run: dict[str, Any]) -> None:
    roles = set(small_run["memory"])
    assert {"supervisor", "fetcher", "shard 0", "shard 1", "shard 2", "shard 3", "reconciler"} <= roles
    for role in ("supervisor", "fetcher", "shard 0", "shard 3", "reconciler"):
        m = small_run["memory"][role]
        assert m["samples"] >= 1
        assert 0 < m["peak_uss_kb"] <= m["peak_pss_kb"] <= m["peak_rss_kb"]
    assert all(any(role in s["procs"] for s in small_run["samples"]) for role in roles)
    assert small_run["memory_by_kind"]["shard"]["processes"] == 4


@pytest.mark.slow
def test_small_run_holds_within_the_claim_capacity(small_run: dict[str, Any]) -> None:
    capacity = small_run["claim_capacity"]
    assert capacity["capacity"] == capacity["shards"] * capacity["max_claimed_per_shard"] == 4 * 500
    assert small_run["held"]["bounded"] is True
    assert max(s["held"] for s in small_run["samples"]) == small_run["held"]["held_max"] <= capacity["capacity"]


@pytest.mark.slow
def test_small_run_finished_and_wrote_everything(small_run: dict[str, Any]) -> None:
    assert small_run["complete"] is True and small_run["error"] is None
    assert small_run["daemon_exit_code"] == 0
    assert small_run["final"]["finished"] == 8000 and small_run["final"]["unfinished"] == 0
    assert small_run["samples"][-1]["ended"] == 8000  # the index-based count agrees with the full scan
    assert small_run["backlog"]["contiguous"] is True and small_run["backlog"]["insert_s"] >= 0
    assert small_run["throughput"]["tasks_per_s"] > 0
    steps = [s["step"] for s in small_run["import_breakdown"]["steps"]]
    assert steps[0] == "interpreter alone" and "+ taskomatic.runtime.shard" in steps
    assert all("rss_kb" in s for s in small_run["import_breakdown"]["steps"])
    assert Path(small_run["_out"], "bounded.png").stat().st_size > 0
    assert "held at most" in small_run["_stdout"]
