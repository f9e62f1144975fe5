"""``python -m bench.multihost_cost``: its pure parts (statement names, CPU by role, the summary), and a
small run against a private PostgreSQL whose figures are checked as present and consistent (their values,
which depend on the machine, are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import measure
from bench.multihost_cost import cpu_by_role, statement_name, summarise

REPO = Path(__file__).resolve().parents[2]


def test_statement_name_is_the_prepared_name_the_benchs_own_or_the_whole_text() -> None:
    assert statement_name('PREPARE "tkm_end_and_start_fenced" AS WITH held AS (SELECT 1)') == "end_and_start_fenced"
    assert statement_name("WITH picked AS ( SELECT id FROM tasks WHERE state = $1") == (
        "WITH picked AS ( SELECT id FROM tasks WHERE state = $1")
    assert statement_name("INSERT INTO tasks (task_target_type) VALUES ($1)").startswith("bench: INSERT")
    # Three of the daemon's statements share their first hundred characters: the names must differ.
    common = "WITH target AS MATERIALIZED ( -- locked in partition order first " + "x" * 60
    assert statement_name(common + " JOIN unnest(...)") != statement_name(common + " WHERE pl.instance_id = $1")


def _stat(pid: int, ticks: int, starttime: int = 1) -> measure.ProcStat:
    return measure.ProcStat(pid=pid, ppid=1, pgrp=10, starttime=starttime, own_ticks=ticks, reaped_ticks=0)


def test_cpu_by_role_adds_a_roles_processes_and_skips_idle_ones() -> None:
    tick_ms = 1000 / measure.CLOCK_TICKS
    before = [_stat(10, 0), _stat(11, 100), _stat(12, 50), _stat(13, 7)]
    after = [_stat(10, 0), _stat(11, 300), _stat(12, 150), _stat(13, 7)]
    roles = {10: "supervisor", 11: "fetcher", 12: "shard 0", 13: "shard 1"}
    assert cpu_by_role(before, after, roles, tasks=100) == {
        "fetcher": round(200 * tick_ms / 100, 4), "shard 0": round(100 * tick_ms / 100, 4)}
    # a pid reused by a new process (another start time) counts from zero, not from the old one's ticks
    assert cpu_by_role([_stat(11, 100)], [_stat(11, 30, starttime=2)], {11: "fetcher"}, tasks=10) == {
        "fetcher": round(30 * tick_ms / 10, 4)}


def test_cpu_by_role_takes_a_reaped_childs_earlier_ticks_off_its_parent() -> None:
    tick_ms = 1000 / measure.CLOCK_TICKS
    child = measure.ProcStat(pid=12, ppid=10, pgrp=10, starttime=1, own_ticks=40, reaped_ticks=0)
    parent_before = measure.ProcStat(pid=10, ppid=1, pgrp=10, starttime=1, own_ticks=100, reaped_ticks=0)
    # the child used 10 more ticks in the window, then exited; its parent reaped all 50
    parent_after = measure.ProcStat(pid=10, ppid=1, pgrp=10, starttime=1, own_ticks=105, reaped_ticks=50)
    used = cpu_by_role([parent_before, child], [parent_after], {10: "supervisor", 12: "shard 0"}, tasks=1)
    assert used == {"supervisor": round(15 * tick_ms, 4)}


def _run(mode: str, tps: float, daemon: float, postgres: float, exec_us: float,
         complete: bool = True) -> dict[str, Any]:
    return {"mode": mode, "complete": complete, "throughput_tps": tps,
            "cpu_ms_per_task": {"daemon": daemon, "postgres": postgres, "fetcher": daemon / 2},
            "transactions_per_task": 0.02, "multixact_slru_blocks": 500 if mode == "multihost" else 0,
            "statements": [{"name": "claim", "exec_us_per_task": exec_us, "hits_per_task": 20.0, "calls": 100}]}


def test_summary_takes_medians_per_mode_of_complete_runs_and_their_ratios() -> None:
    runs = [_run("standalone", 10_000, 0.08, 0.08, 20), _run("standalone", 12_000, 0.09, 0.07, 22),
            _run("standalone", 11_000, 0.10, 0.09, 24),
            _run("multihost", 8_000, 0.10, 0.10, 30), _run("multihost", 9_900, 0.09, 0.12, 34),
            _run("multihost", 9_000, 0.11, 0.11, 32), _run("multihost", 1, 9.0, 9.0, 99, complete=False)]
    warmup = {**_run("standalone", 1, 9.0, 9.0, 99), "warmup": True}
    summary = summarise([warmup, *runs])
    # the failed run and the warm-up are out
    assert summary["standalone"]["runs"] == 3 and summary["multihost"]["runs"] == 3
    assert summary["standalone"]["throughput_tps"] == 11_000 and summary["multihost"]["throughput_tps"] == 9_000
    assert summary["multihost"]["cpu_ms_per_task"]["postgres"] == 0.11
    assert summary["multihost"]["statements"]["claim"]["exec_us_per_task"] == 32
    assert summary["multihost"]["multixact_slru_blocks"] == 500
    ratios = summary["multihost_over_standalone"]
    assert ratios["throughput"] == round(9_000 / 11_000, 3)
    assert ratios["cpu"]["daemon"] == round(0.10 / 0.09, 3) and ratios["cpu"]["postgres"] == round(0.11 / 0.08, 3)


def test_paired_ratios_compare_each_rounds_two_runs() -> None:
    """Each round's multihost run over its standalone run, back to back: the machine's drift over the batch
    (round 1 ran at half speed) cancels within a round. A round with a failed run and the warm-up are out."""
    runs = []
    for round_index, (sa, mh) in enumerate([(10_000, 8_000), (5_000, 4_500), (12_000, 9_600), (11_000, 1)]):
        runs += [{**_run("standalone", sa, 0.1, 0.1, 20), "round": round_index},
                 {**_run("multihost", mh, 0.1, 0.1, 20, complete=round_index != 3), "round": round_index}]
    runs.append({**_run("multihost", 1_000, 0.1, 0.1, 20), "warmup": True, "round": 0})
    paired = summarise(runs)["multihost_over_standalone"]["throughput_paired"]
    assert paired == {"rounds": 3, "median": 0.8, "min": 0.8, "max": 0.9}
    assert summarise([_run("standalone", 10_000, 0.1, 0.1, 20)])["multihost_over_standalone"][
        "throughput_paired"] is None


def test_the_daemons_buffer_hits_per_task_leave_the_benchs_own_statements_out() -> None:
    sa = _run("standalone", 10_000, 0.1, 0.1, 20)
    mh = _run("multihost", 9_000, 0.1, 0.1, 20)
    mh["statements"] += [{"name": "end_and_start_fenced", "exec_us_per_task": 40.0, "hits_per_task": 10.0,
                          "calls": 300},
                         {"name": "bench: INSERT INTO tasks ...", "exec_us_per_task": 9.0, "hits_per_task": 99.0,
                          "calls": 1}]
    summary = summarise([sa, mh])
    assert summary["standalone"]["daemon_hits_per_task"] == 20.0
    assert summary["multihost"]["daemon_hits_per_task"] == 30.0
    assert summary["multihost_over_standalone"]["daemon_hits"] == 1.5


def test_a_statement_a_run_did_not_list_counts_as_zero_in_the_median() -> None:
    runs = [_run("multihost", 9_000, 0.1, 0.1, 30) for _ in range(3)]
    runs[0]["statements"].append({"name": "rare", "exec_us_per_task": 50.0, "hits_per_task": 5.0, "calls": 1})
    assert summarise(runs)["multihost"]["statements"]["rare"]["exec_us_per_task"] == 0


def test_summary_of_a_mode_without_a_complete_run_has_no_ratio() -> None:
    summary = summarise([_run("standalone", 10_000, 0.08, 0.08, 20)])
    assert summary["multihost"]["runs"] == 0 and summary["multihost"]["throughput_tps"] is None
    assert summary["multihost_over_standalone"]["throughput"] is None


@pytest.mark.slow
def test_multihost_cost_runs_both_modes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "bench.multihost_cost", "--tasks", "300", "--keys", "30",
                           "--rounds", "1", "--warmup", "0", "--statements", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (f"bench.multihost_cost exited with {proc.returncode}:\n"
                                  f"{proc.stdout}\n{proc.stderr[-4000:]}")
    assert "multihost / standalone: tasks/s" in proc.stdout
    data: dict[str, Any] = json.loads((tmp_path / "multihost_cost.json").read_text())
    assert [r["mode"] for r in data["runs"]] == ["standalone", "multihost"]
    for run in data["runs"]:
        assert run["complete"] and run["finished"] == 300 and run["order_violations"] == 0
        assert run["throughput_tps"] > 0 and run["transactions_per_task"] > 0
        assert {"daemon", "postgres"} <= set(run["cpu_ms_per_task"])
        assert "?" not in run["cpu_ms_per_task"]  # every process that used CPU has its role
        assert all(value >= 0 for value in run["cpu_ms_per_task"].values())
        names = {s["name"] for s in run["statements"]}
        # each mode's own start-and-end statement (multihost's is fenced by its partition leases)
        own = "end_and_start_fenced" if run["mode"] == "multihost" else "end_and_start"
        assert own in names and not {"end_and_start", "end_and_start_fenced"} - {own} & names, names
        assert any(name.startswith("bench: INSERT INTO tasks") for name in names)
    assert data["summary"]["multihost_over_standalone"]["throughput"] is not None
