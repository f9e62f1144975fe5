"""The bench's lifecycle workload and utilisation timeline, in their pure parts (no server, no nodes).

The real lifecycle run (two libvirt test nodes, the daemon) is in the smoke
suite (tests/bench/test_bench_smoke.py). Here: the mix is a pure function of
the seed and every task is valid where it lands, the lower bound from
measured durations, the VM-row/libvirt comparison, the timeline's data, and
the report with its timeline plot, all checked on hand-made inputs.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench import lifecycle, measure, report, workloads
from bench.workloads import LIFECYCLE_ACTIONS, PlannedTask, Workload
from taskomatic.actions.states import VM_TRANSITIONS, Verdict, precondition
from taskomatic.model import OrderingKey
from taskomatic.runtime.router import shard_for

# -- the lifecycle mix -------------------------------------------------------------------


def lifecycle_workload(tasks: int = 2000, vms: int = 50, keys: str = "uniform") -> Workload:
    return Workload("lifecycle-test", tasks, vms, keys, latency="lifecycle")


@pytest.mark.parametrize("keys", ["uniform", "zipf"])
def test_lifecycle_mix_is_deterministic_per_seed(keys: str) -> None:
    w = lifecycle_workload(keys=keys)
    assert workloads.generate(w, 3) == workloads.generate(w, 3)
    assert workloads.generate(w, 3) != workloads.generate(w, 4)
    tasks = workloads.generate(w, 3)
    assert len(tasks) == 2000 and all(1 <= t.key <= 50 for t in tasks)
    assert all(t.ms == 0.0 and t.args_json == "{}" for t in tasks)  # no args: migrate_vm lets placement choose


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("keys", ["uniform", "zipf"])
def test_every_lifecycle_task_is_valid_where_it_lands(seed: int, keys: str) -> None:
    """Replayed per VM in id order through the daemon's own state table: every action RUNs."""
    tasks = workloads.generate(lifecycle_workload(tasks=600, vms=20, keys=keys), seed)
    state: dict[int, str] = {}
    for t in tasks:
        before = state.get(t.key, "pending")
        assert precondition(t.action, before) == Verdict.RUN, (t, before)
        state[t.key] = VM_TRANSITIONS[t.action].success
    assert workloads.lifecycle_final_states(tasks, 20) == {vm: state.get(vm, "pending") for vm in range(1, 21)}


def test_lifecycle_mix_has_every_vm_action() -> None:
    counts = Counter(t.action for t in workloads.generate(lifecycle_workload(), 1))
    assert set(counts) == set(LIFECYCLE_ACTIONS) == set(VM_TRANSITIONS)
    # Each VM's first task creates it, its second starts it.
    seen: dict[int, list[str]] = {}
    for t in workloads.generate(lifecycle_workload(), 1):
        seen.setdefault(t.key, []).append(t.action)
    assert all(actions[:2] == ["create_vm", "start_vm"][:len(actions)] for actions in seen.values())


def test_zipf_lifecycle_has_a_hot_vm() -> None:
    uniform = Counter(t.key for t in workloads.generate(lifecycle_workload(keys="uniform"), 1))
    zipf = Counter(t.key for t in workloads.generate(lifecycle_workload(keys="zipf"), 1))
    # Zipf(1.1) over 50 VMs: the hottest gets about 1/H(50, 1.1) = 23 % of the tasks.
    assert zipf.most_common(1)[0][1] > 0.15 * 2000
    assert uniform.most_common(1)[0][1] < 0.05 * 2000


def test_next_lifecycle_action_follows_the_state_machine() -> None:
    rng = random.Random(0)
    for state, choices in workloads.LIFECYCLE_NEXT.items():
        for _ in range(50):
            action = workloads.next_lifecycle_action(state, rng)
            assert action in {a for a, _ in choices}
            assert VM_TRANSITIONS[action].start == state
            assert workloads.LIFECYCLE_SUCCESS[action] == VM_TRANSITIONS[action].success


def test_lifecycle_workload_is_described_as_daemon_only() -> None:
    w = lifecycle_workload()
    assert w.needs_libvirt and w.work_measured and w.has_work
    assert "taskomatic only" in w.description
    assert not Workload("x", 10, 2, latency="heavy", base_ms=20).needs_libvirt
    with pytest.raises(ValueError):
        Workload("x", 10, 2, latency="fixed")  # a sleep still needs its base_ms


def test_baselines_are_never_given_the_lifecycle_mix() -> None:
    from bench import run
    from bench.runners import RunnerSpec

    for name in ("smoke", "quick", "full"):
        for entry in run.suite(name):
            if entry.workload.needs_libvirt:
                assert entry.runners and all(spec.kind == "taskomatic" for spec in entry.runners), name
    with pytest.raises(ValueError, match="noop and sleep only"):
        run.execute_run(None, lifecycle_workload(), [], RunnerSpec("original", 1), 1)  # type: ignore[arg-type]


# -- the lower bound from measured durations ------------------------------------------------


def test_lower_bound_from_measured_durations() -> None:
    # VM 7: 0.2 + 0.3 = 0.5 s serial; in all 0.5 + 0.1 + 0.1 + 0.2 = 0.9 s.
    measured = [(7, 0.2), (3, 0.1), (7, 0.3), (4, 0.1), (5, 0.2)]
    stats = workloads.measured_work_stats(measured)
    assert stats.total_s == pytest.approx(0.9)
    assert stats.heaviest_key_s == pytest.approx(0.5)
    assert stats.heaviest_key_tasks == 2
    assert stats.longest_task_s == pytest.approx(0.3)
    assert stats.distinct_keys == 4
    assert workloads.lower_bound(stats, 1) == pytest.approx(0.9)  # total / 1
    assert workloads.lower_bound(stats, 2) == pytest.approx(0.5)  # max(0.5, 0.45): the hot VM
    assert workloads.lower_bound(stats, 4) == pytest.approx(0.5)
    # The hot key's work, not its task count, decides.
    stats = workloads.measured_work_stats([(1, 0.01)] * 5 + [(2, 0.2)])
    assert stats.heaviest_key_s == pytest.approx(0.2) and stats.heaviest_key_tasks == 5
    with pytest.raises(ValueError):
        workloads.measured_work_stats([])
    with pytest.raises(ValueError):
        workloads.measured_work_stats([(1, -0.1)])


def test_planned_work_stats_unchanged() -> None:
    tasks = [PlannedTask(1, "sleep", 100.0)] * 3 + [PlannedTask(2, "sleep", 50.0)]
    stats = workloads.work_stats(tasks)
    assert (stats.total_s, stats.heaviest_key_s, stats.heaviest_key_tasks) == pytest.approx((0.35, 0.3, 3))


# -- VM rows against libvirt ------------------------------------------------------------------


def test_compare_vms() -> None:
    rows = [
        {"id": 1, "uuid": "u1", "state": "running", "host_id": 10},
        {"id": 2, "uuid": "u2", "state": "suspended", "host_id": 11},
        {"id": 3, "uuid": "u3", "state": "saved", "host_id": 10},
        {"id": 4, "uuid": "u4", "state": "stopped", "host_id": None},
        {"id": 5, "uuid": "u5", "state": "pending", "host_id": None},
    ]
    planned = {1: "running", 2: "suspended", 3: "saved", 4: "stopped", 5: "pending"}
    domains = {"u1": [(10, "running")], "u2": [(11, "suspended")], "u3": [(10, "stopped")]}
    assert lifecycle.compare_vms(rows, planned, domains) == []
    # Running on the wrong node; active on both; a stopped VM's domain still running; a row the plan disagrees with.
    bad = lifecycle.compare_vms(rows, {**planned, 5: "running"},
                                {"u1": [(11, "running")], "u2": [(11, "suspended"), (10, "running")],
                                 "u3": [(10, "stopped")], "u4": [(10, "running")]})
    assert [p["vm"] for p in bad] == [1, 2, 4, 5]
    assert "its last task leaves it running" in bad[3]["why"]
    assert lifecycle.compare_vms([{"id": 6, "uuid": "u6", "state": "migrating", "host_id": 10}], {}, {})[0]["vm"] == 6


def test_action_durations() -> None:
    rows = [{"action": "start_vm", "started": 0.0, "ended": 0.004},
            {"action": "start_vm", "started": 1.0, "ended": 1.002},
            {"action": "create_vm", "started": 2.0, "ended": 2.001},
            {"action": "migrate_vm", "started": 3.0, "ended": None}]
    out = lifecycle.action_durations(rows)
    assert list(out) == ["create_vm", "start_vm"]  # in the catalogue's order; unfinished tasks left out
    assert out["start_vm"]["count"] == 2 and out["start_vm"]["mean_ms"] == pytest.approx(3.0)
    assert out["start_vm"]["max_ms"] == pytest.approx(4.0)


def test_node_dirs_fit_a_unix_socket(tmp_path: Path) -> None:
    assert lifecycle.short_dir(Path("/tmp/taskomatic-bench-abcdefgh"), 7).name == "n07"
    with pytest.raises(ValueError):
        lifecycle.short_dir(Path("/tmp/" + "x" * 90), 1)


# -- the timeline data ----------------------------------------------------------------------


def keys_on(shard: int, shards: int, count: int) -> list[int]:
    """VM ids the old hash routing (``router.shard_for``) sends to ``shard``: the fallback for rows with no slot."""
    found = [k for k in range(1, 1000) if shard_for(OrderingKey("Vm", k), shards) == shard]
    return found[:count]


def row(key: int, created: float, started: float | None, ended: float | None,
        shard: int | None = None) -> dict[str, Any]:
    return {"key_id": key, "run_by_shard": shard, "created": created, "started": started, "ended": ended}


def test_timeline_by_hand() -> None:
    # Attributed by the slot the table recorded: key 7 moves from shard 0 to shard 1 once it has nothing in
    # flight (a free key goes to whichever shard has room), keys 8 and 9 share shard 1; no key hash involved.
    rows = [row(7, 100.0, 100.5, 101.0, 0), row(8, 100.0, 101.0, 101.5, 0),  # shard 0, back to back
            row(9, 100.2, 100.6, 100.8, 1), row(7, 100.2, 102.0, 103.0, 1),  # shard 1, a gap
            row(7, 100.3, None, None, None)]  # never ran: counted for t0 only
    tl = measure.shard_timeline(rows, 2)
    assert tl is not None
    assert tl["t0_epoch"] == 100.0 and tl["end_s"] == pytest.approx(3.0)
    assert tl["first_start_s"] == pytest.approx(0.5)
    assert tl["consistent"] and tl["attributed_by"] == "tasks.run_by_shard" and tl["attributed_by_hash"] == 0
    assert tl["busy"] == [[[0.5, 1.5]], [[0.6, 0.8], [2.0, 3.0]]]  # touching intervals merged
    assert tl["busy_s"] == pytest.approx([1.0, 1.2])
    assert tl["tasks_per_shard"] == [2, 2] and tl["overlaps"] == [0, 0] and tl["out_of_range"] == 0
    # One task ending as the next starts (t=1.0) is one running, not two.
    assert tl["running"] == [[0.5, 1], [0.6, 2], [0.8, 1], [1.0, 1], [1.5, 0], [2.0, 1], [3.0, 0]]
    assert tl["waiting"] == [[0.0, 2], [0.2, 4], [0.5, 3], [0.6, 2], [1.0, 1], [2.0, 0]]
    assert tl["running_bin_s"] is None and tl["merge_gap_s"] == 0


def test_timeline_uses_the_recorded_slot_not_the_hash() -> None:
    a, b = keys_on(1, 3, 2)  # the old hash would put both on shard 1, where they overlap
    tl = measure.shard_timeline([row(a, 0.0, 1.0, 3.0, 0), row(b, 0.0, 2.0, 4.0, 2)], 3)
    assert tl is not None and tl["consistent"] and tl["attributed_by"] == "tasks.run_by_shard"
    assert tl["tasks_per_shard"] == [1, 0, 1] and tl["busy"] == [[[1.0, 3.0]], [], [[2.0, 4.0]]]


def test_timeline_flags_a_shard_running_two_tasks_at_once() -> None:
    # Recorded on one slot and overlapping: the daemon broke "one task at a time per shard".
    tl = measure.shard_timeline([row(1, 0.0, 1.0, 3.0, 1), row(2, 0.0, 2.0, 4.0, 1), row(3, 0.0, 2.5, 2.6, 1)], 3)
    assert tl is not None and not tl["consistent"] and tl["attributed_by"] == "tasks.run_by_shard"
    assert tl["tasks_per_shard"] == [0, 3, 0] and tl["busy"][1] == [[1.0, 4.0]] and tl["overlaps"] == [0, 2, 0]
    # A slot the run did not have is inconsistent too, and not drawn.
    tl = measure.shard_timeline([row(1, 0.0, 1.0, 3.0, 5)], 3)
    assert tl is not None and not tl["consistent"] and tl["out_of_range"] == 1 and tl["tasks_per_shard"] == [0, 0, 0]
    assert measure.shard_timeline([row(1, 0.0, None, None)], 3) is None


def test_timeline_falls_back_to_the_hash_without_a_recorded_slot() -> None:
    a, b = keys_on(1, 3, 2)
    tl = measure.shard_timeline([row(a, 0.0, 1.0, 3.0), row(b, 0.0, 2.0, 4.0)], 3)  # old rows: no run_by_shard
    assert tl is not None and not tl["consistent"] and tl["attributed_by_hash"] == 2
    assert tl["attributed_by"].startswith("router.shard_for")
    assert tl["tasks_per_shard"] == [0, 2, 0] and tl["busy"][1] == [[1.0, 4.0]]
    # A row dict from before the column existed (no key at all) is the same.
    old = [{k: v for k, v in row(a, 0.0, 1.0, 3.0).items() if k != "run_by_shard"}, row(b, 0.0, 3.0, 4.0, 0)]
    tl = measure.shard_timeline(old, 3)
    assert tl is not None and tl["consistent"] and tl["tasks_per_shard"] == [1, 1, 0]
    assert tl["attributed_by"] == "tasks.run_by_shard, router.shard_for for 1 of 2 tasks with none recorded"


def test_per_shard_utilisation_from_the_recorded_slot() -> None:
    from bench.run_figures import per_shard

    ran = [row(1, 0.0, 0.0, 1.0, 0), row(1, 0.0, 1.0, 2.0, 1), row(2, 0.0, 0.5, 1.5, 1)]  # shard 1 overlaps
    out = per_shard(ran[:2], 2, 0.0, 2.0)
    assert out["per_shard"] == [0.5, 0.5] and out["tasks_per_shard"] == [1, 1] and out["per_shard_overlaps"] == 0
    assert "tasks.run_by_shard" in out["per_shard_note"] and "consistent" in out["per_shard_note"]
    out = per_shard(ran, 2, 0.0, 2.0)  # kept, and flagged: a shard ran two tasks at once
    assert out["per_shard"] == [0.5, 1.0] and out["per_shard_overlaps"] == 1
    assert "INCONSISTENT" in out["per_shard_note"] and "daemon bug" in out["per_shard_note"]
    a, b = keys_on(0, 2, 2)
    out = per_shard([row(a, 0.0, 0.0, 1.0), row(b, 0.0, 0.5, 1.5)], 2, 0.0, 1.5)  # hash fallback, overlapping
    assert out["per_shard"] is None and "router.shard_for" in out["per_shard_note"]


def test_timeline_stays_small() -> None:
    rows = [row(1 + i % 7, 0.0, i * 0.01, i * 0.01 + 0.005, 0) for i in range(1000)]
    tl = measure.shard_timeline(rows, 1, max_intervals=100, max_points=200)
    assert tl is not None
    assert len(tl["busy"][0]) <= 100  # 5 ms gaps closed at a 0.1 s resolution
    assert tl["busy_s"] == pytest.approx([5.0])  # exact, whatever the merging
    assert tl["running_bin_s"] == pytest.approx(tl["end_s"] / 100) and len(tl["running"]) == 100
    # Time-weighted means: half of every bin has the one task running.
    assert all(p[1] == pytest.approx(0.5, abs=0.06) for p in tl["running"])


def test_step_merge_and_bin_by_hand() -> None:
    assert measure.merge_intervals([(3, 4), (0, 1), (1, 2), (2.5, 2.6)]) == [(0, 2), (2.5, 2.6), (3, 4)]
    assert measure.merge_intervals([(0, 1), (1.2, 2), (2.9, 3)], gap=0.5) == [(0, 2), (2.9, 3)]
    assert measure.merge_intervals([(0, 5), (1, 2)]) == [(0, 5)]
    assert measure.step_curve([(0, 1), (1, 1), (1, -1), (2, -1)]) == [[0, 1], [1, 1], [2, 0]]
    # 2 running over [0, 1), 1 over [1, 3), 0 after: bins of 2 s over [0, 4).
    assert measure.bin_curve([[0, 2], [1, 1], [3, 0]], 4.0, 2) == [[0.0, 1.5], [2.0, 0.5]]
    assert measure.bin_curve([], 4.0, 2) == []


# -- the report with its timeline plot --------------------------------------------------------


def fake_results() -> dict[str, Any]:
    """A results.json as bench.run writes it, with one heavy run and one lifecycle run (made-up figures)."""
    shards = 4
    rng = random.Random(5)
    rows = []
    clock = [0.0] * shards
    for i in range(200):
        key = rng.randint(1, 40)
        shard = min(range(shards), key=lambda s: clock[s])  # the shard with room first
        start = clock[shard] + 0.001
        clock[shard] = start + (1.0 if i % 20 == 0 else 0.02)
        rows.append(row(key, 0.0, start, clock[shard], shard))
    timeline = measure.shard_timeline(rows, shards)

    def run(workload: str, **extra: Any) -> dict[str, Any]:
        return {"workload": workload, "runner": "taskomatic", "parallelism": shards, "label": "taskomatic 4 shards",
                "complete": True, "error": None, "throughput_tps": 100.0, "span_s": 2.0, "makespan_s": 2.1,
                "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0, "mean": 1.5},
                "latency_cdf_ms": [[1.0, 0.5], [4.0, 1.0]], "lower_bound_s": 1.5, "makespan_ratio": 1.4,
                "cpu": {"runner_s_per_1k": 1.0, "postgres_s_per_1k": 0.5, "other_share": 0.01},
                "order": {"ok": True, "violations": 0, "keys": 40},
                "tasks": {"total": 200, "expected": 200, "finished": 200, "failed": 0, "other": 0},
                "utilisation": {"pool": 0.5, "per_shard": [0.5] * shards, "tasks_per_shard": [50] * shards,
                                "per_shard_note": "attributed by tasks.run_by_shard"},
                "rss": {"runner": [{"role": "shard 0", "pid": 1, "peak_rss_kb": 20000}], "postgres": []},
                "ratios": {}, "timeline": timeline, **extra}

    lifecycle_run = run("lifecycle-zipf", lower_bound_from="measured durations",
                        measured_work={"total_s": 1.0, "heaviest_key_s": 0.5, "heaviest_key_tasks": 30,
                                       "longest_task_s": 0.01, "distinct_keys": 40},
                        action_ms={"create_vm": {"count": 40, "mean_ms": 0.1, "p50_ms": 0.1, "p95_ms": 0.2,
                                                 "max_ms": 0.3}},
                        lifecycle={"ok": True, "tasks": {"failed": 0}, "failures": [], "vms": 40, "domains": 30,
                                   "vm_mismatches": 0, "vm_mismatch_examples": [], "libvirt_error": None})
    lifecycle_run["cpu"]["nodes_s_per_1k"] = 0.3
    return {
        "schema": 1, "suite": "quick", "seed": 1, "started_at": "2026-01-01T00:00:00+00:00", "wall_s": 10.0,
        "machine": {"cpu_model": "test", "cores": 2, "cores_usable": 2, "memory_kb": 1 << 20, "kernel": "6",
                    "os": "test", "python": "3.11", "postgresql": "15", "postgresql_settings": {},
                    "commit": "0" * 40},
        "settings": {"baseline_poll_s": 1.0, "daemon_settings": [], "daemon_config": {}},
        "workloads": [
            {"name": "heavy-zipf", "description": "heavy", "total_work_s": 10.0, "heaviest_key_work_s": 2.0,
             "heaviest_key_tasks": 20},
            {"name": "lifecycle-zipf", "description": "lifecycle", "total_work_s": None, "heaviest_key_work_s": None,
             "heaviest_key_tasks": 30, "work_measured": True},
        ],
        "runs": [run("heavy-zipf"), lifecycle_run],
        "checks": {"all_runs_complete": True, "all_tasks_finished": True, "taskomatic_order_ok": True,
                   "ordered_runners_order_ok": True, "lifecycle_consistent": True},
    }


def test_timeline_run_choice() -> None:
    results = fake_results()
    chosen = report.timeline_runs(results)
    assert [(name, r["workload"]) for name, r in chosen] == [
        ("utilisation_timeline.png", "heavy-zipf"), ("utilisation_timeline_lifecycle.png", "lifecycle-zipf")]
    results["runs"] = results["runs"][1:]
    assert [name for name, _ in report.timeline_runs(results)] == ["utilisation_timeline.png"]
    results["runs"] = []
    assert report.timeline_runs(results) == []


@pytest.mark.slow
def test_report_renders_the_timeline_and_lifecycle_sections(tmp_path: Path) -> None:
    results = fake_results()
    text = report.markdown(results, [])
    assert "## Utilisation timeline" in text and "**heavy-zipf / taskomatic 4 shards**" in text
    assert "attributed by tasks.run_by_shard, consistent" in text and "shard_for" not in text
    assert "## VM lifecycle on libvirt test nodes" in text
    assert "do not run the lifecycle workloads" in text
    assert "| lifecycle-zipf | lifecycle | measured | measured | 30 |" in text
    pytest.importorskip("matplotlib")
    written = {p.name for p in report.write(results, tmp_path, plots=True)}
    assert {"report.md", "utilisation_timeline.png", "utilisation_timeline_lifecycle.png"} <= written
    assert (tmp_path / "utilisation_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![utilisation_timeline.png](utilisation_timeline.png)" in (tmp_path / "report.md").read_text()
