"""The benchmark suite in its tiny mode (``python -m bench.run --smoke``), plus its pure parts.

The smoke run is the real thing at toy size: a private PostgreSQL, the real
daemon with the bench's ``noop`` plugin (shards 1 and 2) and both baselines,
200 tasks over 20 keys each; and the VM lifecycle mix (60 tasks on 10 VMs) on
two private libvirt test nodes through the daemon with 2 shards. It asserts
that every figure is there, every task finished, per-key order held and the
VM rows agree with libvirt; never what the figures are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import workloads
from bench.workloads import PlannedTask, Workload

REPO = Path(__file__).resolve().parents[2]
SMOKE_TASKS = {"noop-uniform": 200, "lifecycle-uniform": 60}
SMOKE_KEYS = {"noop-uniform": 20, "lifecycle-uniform": 10}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-smoke")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--no-progress", "--no-plots", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"bench exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    results["_out"] = str(out)
    return results


@pytest.mark.slow
def test_smoke_runs_the_daemon_and_both_baselines(smoke: dict[str, Any]) -> None:
    runs = {(r["workload"], r["runner"], r["parallelism"]) for r in smoke["runs"]}
    assert runs == {("noop-uniform", "original", 1), ("noop-uniform", "pool", 2), ("noop-uniform", "taskomatic", 1),
                    ("noop-uniform", "taskomatic", 2), ("lifecycle-uniform", "taskomatic", 2)}
    assert smoke["suite"] == "smoke"
    # The routing dimension: one routing in the smoke run (the daemon's default), named in every daemon run.
    assert smoke["settings"]["routings"] == ["pinned"]
    assert {r.get("routing") for r in smoke["runs"] if r["runner"] == "taskomatic"} == {"pinned"}
    assert all("routing" not in r for r in smoke["runs"] if r["runner"] != "taskomatic")
    assert smoke["checks"] == {"all_runs_complete": True, "all_tasks_finished": True,
                               "taskomatic_order_ok": True, "ordered_runners_order_ok": True,
                               "lifecycle_consistent": True}


@pytest.mark.slow
def test_every_task_finished_in_every_run(smoke: dict[str, Any]) -> None:
    for run in smoke["runs"]:
        assert run["complete"], run.get("error")
        assert run["error"] is None
        assert run["runner_exit_code"] == 0
        n = SMOKE_TASKS[run["workload"]]
        assert run["tasks"] == {"total": n, "expected": n, "finished": n, "failed": 0, "other": 0}


@pytest.mark.slow
def test_per_key_order_checked_in_sql_and_held(smoke: dict[str, Any]) -> None:
    for run in smoke["runs"]:
        order = run["order"]
        assert set(order) >= {"violations", "keys", "ok"}
        assert 1 <= order["keys"] <= SMOKE_KEYS[run["workload"]]
        if run["runner"] != "pool":  # the SKIP LOCKED pool promises no order; its count is only recorded
            assert order["ok"] and order["violations"] == 0, run["label"]


@pytest.mark.slow
def test_every_figure_is_there(smoke: dict[str, Any]) -> None:
    machine = smoke["machine"]
    for key in ("cpu_model", "cores", "memory_kb", "kernel", "python", "postgresql", "commit"):
        assert machine[key], key
    for run in smoke["runs"]:
        assert run["throughput_tps"] > 0
        assert set(run["latency_ms"]) == {"p50", "p95", "p99", "max", "mean"}
        assert run["latency_ms"]["p50"] <= run["latency_ms"]["p95"] <= run["latency_ms"]["p99"]
        assert run["latency_cdf_ms"][-1][1] == 1.0
        assert run["makespan_s"] > 0
        assert set(run["cpu"]) >= {"runner_s", "postgres_s", "runner_s_per_1k", "postgres_s_per_1k",
                                   "machine_busy_s", "other_share"}
        assert run["rss"]["runner"] and run["rss"]["postgres"]
        assert all(p["peak_rss_kb"] > 0 for p in run["rss"]["runner"])
        if run["workload"] == "noop-uniform":
            assert "vs_original" in run["ratios"] or run["runner"] == "original"
            assert "vs_pool" in run["ratios"] or run["runner"] == "pool"
        else:  # no baseline runs the lifecycle mix, so there is nothing to divide by
            assert run["ratios"] == {}
        assert run["utilisation"]["pool"] is not None
    for run in (r for r in smoke["runs"] if r["runner"] == "taskomatic"):
        roles = {p["role"] for p in run["rss"]["runner"]}
        assert {"supervisor", "fetcher"} <= roles
        assert {f"shard {i}" for i in range(run["parallelism"])} <= roles
        assert len(run["utilisation"]["per_shard"]) == run["parallelism"]
        assert sum(run["utilisation"]["tasks_per_shard"]) == SMOKE_TASKS[run["workload"]]
        # Every task's slot is recorded (tasks.run_by_shard), and a shard never ran two tasks at once.
        assert run["utilisation"]["per_shard_overlaps"] == 0, run["utilisation"]["per_shard_note"]
        assert run["utilisation"]["per_shard_note"].startswith("attributed by tasks.run_by_shard (consistent")
        # The daemon's claim stamps claimed_at: enqueue-to-start splits at the claim, every task.
        split = run["latency_split_ms"]
        assert split["tasks"] == SMOKE_TASKS[run["workload"]]
        assert 0 <= split["to_claim_p50"] <= split["to_claim_p99"] and split["claim_to_start_p50"] >= 0
        if run["workload"] == "noop-uniform":
            assert run["ratios"]["vs_original"]["baseline"].startswith("original")
            assert run["ratios"]["vs_pool"]["baseline"].startswith("SKIP LOCKED pool")
    report = (Path(smoke["_out"]) / "report.md").read_text()
    assert "| noop-uniform | taskomatic 2 shards, pinned routing |" in report
    assert "## VM lifecycle on libvirt test nodes" in report and "do not run the lifecycle" in report


@pytest.mark.slow
def test_lifecycle_run_on_libvirt_nodes(smoke: dict[str, Any]) -> None:
    run = next(r for r in smoke["runs"] if r["workload"] == "lifecycle-uniform")
    checks = run["lifecycle"]
    assert checks["ok"], checks
    assert checks["tasks"] == {"not_ended": 0, "bad_times": 0, "attempts_not_1": 0, "failed": 0}
    assert checks["vms"] == 10 and checks["vm_mismatches"] == 0 and checks["libvirt_error"] is None
    assert checks["domains"] >= 1  # some VM was started: its domain is on a node
    work = run["measured_work"]
    assert 0 < work["heaviest_key_s"] <= work["total_s"]
    assert run["lower_bound_from"] == "measured durations"
    assert run["lower_bound_s"] == pytest.approx(max(work["heaviest_key_s"], work["total_s"] / 2), abs=2e-4)
    assert run["makespan_ratio"] >= 1.0  # a real makespan can never beat its lower bound
    assert {"create_vm", "start_vm"} <= set(run["action_ms"])
    assert sum(a["count"] for a in run["action_ms"].values()) == SMOKE_TASKS["lifecycle-uniform"]
    assert run["cpu"]["nodes_s"] >= 0
    timeline = run["timeline"]
    assert timeline["shards"] == 2 and timeline["consistent"], timeline["overlaps"]
    assert timeline["attributed_by"] == "tasks.run_by_shard" and timeline["out_of_range"] == 0
    assert sum(timeline["tasks_per_shard"]) == SMOKE_TASKS["lifecycle-uniform"]
    workload = next(w for w in smoke["workloads"] if w["name"] == "lifecycle-uniform")
    assert workload["work_measured"] and workload["total_work_s"] is None and "not run" in workload["baselines"]


@pytest.mark.slow
def test_plots_render(smoke: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench import report

    written = {p.name for p in report.write(smoke, tmp_path, plots=True)}
    assert {"report.md", "throughput_vs_shards.png", "latency_cdf.png", "utilisation_timeline.png"} <= written
    assert (tmp_path / "utilisation_timeline.png").stat().st_size > 0
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0


# -- the pure parts -------------------------------------------------------------------


def test_workloads_are_deterministic_per_seed() -> None:
    w = Workload("w", 500, 50, "zipf", latency="heavy", base_ms=20)
    assert workloads.generate(w, 7) == workloads.generate(w, 7)
    assert workloads.generate(w, 7) != workloads.generate(w, 8)
    tasks = workloads.generate(w, 7)
    assert len(tasks) == 500 and all(1 <= t.key <= 50 for t in tasks)
    assert {t.ms for t in tasks} <= {20.0, 1000.0}


def test_zipf_weights() -> None:
    weights = workloads.zipf_weights(100, 1.1)
    assert abs(sum(weights) - 1.0) < 1e-9
    assert weights[0] / weights[1] == pytest.approx(2 ** 1.1)


def test_lower_bound_formula() -> None:
    # Key 1: 3 x 100 ms serial = 0.3 s; total 0.5 s.
    tasks = [PlannedTask(1, "sleep", 100.0)] * 3 + [PlannedTask(k, "sleep", 100.0) for k in (2, 3)]
    stats = workloads.work_stats(tasks)
    assert stats.total_s == pytest.approx(0.5) and stats.heaviest_key_s == pytest.approx(0.3)
    assert workloads.lower_bound(stats, 1) == pytest.approx(0.5)  # total / 1
    assert workloads.lower_bound(stats, 4) == pytest.approx(0.3)  # the hot key's serial work
    assert workloads.lower_bound(stats, 4, keyed=False) == pytest.approx(0.125)  # total / 4
    assert workloads.lower_bound(stats, 100, keyed=False) == pytest.approx(0.1)  # one task


def test_plugin_entry_point_is_found(tmp_path: Path) -> None:
    from bench.plugin import write_dist_info

    write_dist_info(tmp_path)
    code = ("from taskomatic.actions.registry import load_actions; a = load_actions(); "
            "print(a['noop'].name, a['sleep'].name)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == ["noop", "sleep"]
