"""The multihost benchmark (``bench/multihost/``): its pure parts, and a smoke run.

The smoke run (``python -m bench.multihost --smoke``) is the real thing at toy
size: a private PostgreSQL, real daemons in multihost mode with the bench's
plugin, one instance killed with SIGKILL and its partitions taken over (with a
3 s lease, so that it fits in a test), a second instance joining a loaded one
and leaving again, then 400 no-op tasks through a standalone instance and
through 1 and 2 multihost instances. It asserts that the figures are there and
that the correctness checks held; never what the figures are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.multihost import cli, output, suite
from bench.multihost import join as mh_join
from bench.multihost import scaling as mh_scaling
from bench.multihost import takeover as mh_takeover
from bench.multihost.suite import Plan

REPO = Path(__file__).resolve().parents[2]


# -- pure parts ---------------------------------------------------------------------------


def test_summarise() -> None:
    assert suite.summarise([]) == {"n": 0, "min": None, "median": None, "max": None}
    assert suite.summarise([12.0, 10.0, 11.5]) == {"n": 3, "min": 10.0, "median": 11.5, "max": 12.0}
    assert suite.summarise([1.0, 2.0])["median"] == 1.5


def _event(at: float, op: str, partition: int, instance: int | None, token: int, txid: int = 1,
           previous: int | None = None) -> dict[str, Any]:
    return {"at": at, "op": op, "partition": partition, "instance_id": instance, "previous": previous,
            "token": token, "txid": txid}


def test_takeover_figures_by_hand() -> None:
    t0 = 1000.0
    held = {1: 10, 2: 11, 3: 12}
    events = [
        _event(990.0, "acquire", 1, 7, 10),  # the victim's own acquisitions, before the kill
        _event(991.0, "acquire", 4, 8, 13),  # not one of its partitions
        _event(1009.0, "acquire", 1, 8, 20, txid=5, previous=7),
        _event(1009.0, "acquire", 2, 8, 21, txid=5, previous=7),
        _event(1010.0, "release", 1, None, 20, previous=8),  # handed on after the move: still moved at 1009
        _event(1011.0, "acquire", 1, 9, 22),  # acquired again later: the first move counts
        _event(1011.5, "acquire", 3, 9, 23, txid=6, previous=7),
    ]
    starts = [
        {"partition": 1, "claimed_by": 8, "started": 1009.5},
        {"partition": 2, "claimed_by": 8, "started": 1009.2},
        {"partition": 3, "claimed_by": 9, "started": 1012.0},
        {"partition": 3, "claimed_by": 7, "started": 1000.1},  # the victim's: ignored
    ]
    f = mh_takeover.takeover_figures(t0, {7}, held, events, starts)
    assert f["partitions_at_kill"] == 3 and f["partitions_moved"] == 3
    assert f["first_partition_s"] == 9.0
    assert f["all_partitions_s"] == 11.5
    assert f["first_task_s"] == pytest.approx(9.2)
    assert f["moved_to"] == {"8": 2, "9": 1}
    assert f["takeover_transactions"] == 2
    assert f["tokens_increased"] is True
    assert f["started_before_partition_moved"] == []
    assert [k["partition"] for k in f["per_partition"]] == [1, 2, 3]


def test_takeover_figures_flag_what_is_wrong() -> None:
    t0 = 1000.0
    held = {1: 10, 2: 11}
    events = [_event(1009.0, "acquire", 1, 8, 5, previous=7)]  # a token that went down
    starts = [{"partition": 1, "claimed_by": 8, "started": 1008.0},  # before its partition moved
              {"partition": 2, "claimed_by": 8, "started": 1003.0}]  # its partition never moved
    f = mh_takeover.takeover_figures(t0, {7}, held, events, starts)
    assert f["partitions_moved"] == 1
    assert f["all_partitions_s"] is None
    assert f["tokens_increased"] is False
    assert {e["partition"] for e in f["started_before_partition_moved"]} == {1, 2}
    assert mh_takeover.takeover_figures(t0, {7}, {}, [], [])["first_partition_s"] is None


def test_join_figures_by_hand() -> None:
    joined, left = 100.0, 200.0
    events = [_event(90.0 + p * 0.01, "acquire", p, 1, p + 1) for p in range(4)]  # the first takes all 4
    events += [_event(101.0, "release", 2, None, 3, previous=1), _event(101.5, "acquire", 2, 2, 10),
               _event(102.0, "release", 3, None, 4, previous=1), _event(103.0, "acquire", 3, 2, 11),
               # the leave: the joiner releases, the first takes them back with new tokens
               _event(200.5, "release", 2, None, 10, previous=2), _event(201.0, "acquire", 2, 1, 12),
               _event(200.6, "release", 3, None, 11, previous=2), _event(202.5, "acquire", 3, 1, 13)]
    f = mh_join.join_figures(joined, left, {1}, {2}, 4, events, [101.8, 104.0])
    assert f["first_partition_s"] == 1.5 and f["first_task_s"] == pytest.approx(1.8)
    assert f["even_share_s"] == 3.0 and f["partitions_moved_to_joiner"] == 2
    assert f["all_back_after_leave_s"] == 2.5 and f["tokens_increased"]
    never_back = mh_join.join_figures(joined, left, {1}, {2}, 4, events[:-1], [])
    assert never_back["all_back_after_leave_s"] is None and never_back["first_task_s"] is None
    down = mh_join.join_figures(joined, left, {1}, {2}, 4, [*events, _event(300.0, "acquire", 0, 1, 1)], [])
    assert down["tokens_increased"] is False


def _counts(**changes: Any) -> dict[str, Any]:
    base = {"total": 10, "finished": 10, "failed": 0, "unended": 0, "bad_times": 0, "never_marked": 0,
            "rerun_ids": []}
    return {**base, **changes}


def test_ended_once_verdict() -> None:
    assert suite.ended_once_verdict(_counts(), 10, set())["ok"]
    # A task in flight at the kill, reconciled as "not started" and run again: allowed.
    verdict = suite.ended_once_verdict(_counts(rerun_ids=[3]), 10, {3})
    assert verdict["ok"] and verdict["reruns_in_flight_at_kill"] == 1
    # Any other second run is not.
    verdict = suite.ended_once_verdict(_counts(rerun_ids=[3, 4]), 10, {3})
    assert not verdict["ok"] and verdict["reruns_unexplained"] == [4]
    assert not suite.ended_once_verdict(_counts(unended=1, finished=9), 10, set())["ok"]
    assert not suite.ended_once_verdict(_counts(total=11, finished=11), 10, set())["ok"]
    assert not suite.ended_once_verdict(_counts(failed=1, finished=9), 10, set())["ok"]


def test_plans() -> None:
    quick, full, smoke = (suite.plan_for(n) for n in ("quick", "full", "smoke"))
    assert (quick.takeover_repeats, full.takeover_repeats) == (3, 10)
    assert quick.settings == () and full.settings == ()  # the defaults are what is measured
    assert (quick.scale_tasks, quick.scale_keys, full.scale_tasks) == (5000, 500, 20000)
    assert quick.scale_instances == (1, 2, 3)
    assert smoke.settings  # the smoke run shortens the lease, and says so
    three = quick.with_instances(3)
    assert isinstance(three, Plan) and three.takeover_instances == 3
    assert three.takeover_initial == 1500 and three.scale_instances == quick.scale_instances
    with pytest.raises(ValueError):
        suite.plan_for("huge")


def test_kill_jitter_is_seeded_and_within_one_renewal() -> None:
    values = [mh_takeover.kill_jitter(1, rep, 2.0) for rep in range(20)]
    assert values == [mh_takeover.kill_jitter(1, rep, 2.0) for rep in range(20)]
    assert all(0.0 <= v <= 2.0 for v in values) and len(set(values)) == 20
    assert mh_takeover.kill_jitter(2, 0, 2.0) != values[0]
    stagger = mh_takeover.start_stagger(1, 0, 3, 2.0)
    assert stagger[0] == 0.0 and len(stagger) == 3 and all(0.0 <= v <= 2.0 for v in stagger)
    assert stagger == mh_takeover.start_stagger(1, 0, 3, 2.0) != mh_takeover.start_stagger(1, 1, 3, 2.0)


def test_results_path(tmp_path: Path) -> None:
    assert output.results_path(None, "S") == output.RESULTS_DIR / "multihost-S.json"
    assert output.results_path(tmp_path / "x.json", "S") == tmp_path / "x.json"
    assert output.results_path(tmp_path, "S") == tmp_path / "multihost-S.json"


def test_scaling_summary_medians_and_ratios() -> None:
    def run(mode: str, n: int, routing: str, tps: float, share: list[float], pg: float = 2.0) -> dict[str, Any]:
        return {"setup": mh_scaling.setup_label(n, mode == "multihost", routing), "mode": mode, "instances": n,
                "routing": routing, "ok": True, "throughput_tps": tps,
                "cpu": {"taskomatic_s_per_1k": 1.0, "postgres_s_per_1k": pg, "other_share": 0.01},
                "share_per_instance": share, "partition_acquisitions": None if mode == "standalone" else 256,
                "share_spread": None if mode == "standalone" else 0.2}

    rows = mh_scaling.scaling_summary([run("standalone", 1, "pinned", 1000, [1.0]),
                                      run("standalone", 1, "hash", 800, [1.0], pg=1.0),
                                      run("multihost", 2, "pinned", 400, [0.5, 0.5]),
                                      run("multihost", 2, "pinned", 600, [0.4, 0.6], pg=4.0),
                                      run("multihost", 2, "pinned", 500, [0.45, 0.55], pg=3.0),
                                      run("multihost", 2, "hash", 600, [0.5, 0.5], pg=1.5)])
    by = {r["setup"]: r for r in rows}
    assert by["standalone, pinned"]["throughput_vs_standalone"] == 1.0
    assert by["2 multihost, pinned"]["throughput_tps"] == 500
    assert by["2 multihost, pinned"]["throughput_vs_standalone"] == 0.5
    assert by["2 multihost, pinned"]["postgres_cpu_vs_standalone"] == 1.5  # median 3.0 over 2.0
    assert by["2 multihost, pinned"]["runs"] == 3 and by["2 multihost, pinned"]["partition_acquisitions"] == 256
    # Each routing is compared with the standalone run of the same routing.
    assert by["2 multihost, hash"]["throughput_vs_standalone"] == 0.75
    assert by["2 multihost, hash"]["postgres_cpu_vs_standalone"] == 1.5


def test_paired_ratios_compare_runs_of_the_same_pass() -> None:
    def run(mode: str, routing: str, rep: int, tps: float, pg: float) -> dict[str, Any]:
        return {"setup": mh_scaling.setup_label(1, mode == "multihost", routing), "mode": mode, "instances": 1,
                "routing": routing, "repetition": rep, "ok": True, "throughput_tps": tps,
                "cpu": {"taskomatic_s_per_1k": 1.0, "postgres_s_per_1k": pg, "other_share": 0.0},
                "share_per_instance": [1.0]}

    # The machine was fast in pass 1 and slow in pass 2: paired, multihost is 0.9x and 0.8x standalone.
    runs = [run("standalone", "pinned", 1, 1000, 2.0), run("multihost", "pinned", 1, 900, 2.2),
            run("standalone", "pinned", 2, 500, 4.0), run("multihost", "pinned", 2, 400, 6.0),
            run("multihost", "pinned", 3, 999, 1.0),  # its pass has no standalone run: left out
            run("standalone", "hash", 1, 100, 1.0)]  # another routing's reference: not used
    by = {r["setup"]: r for r in mh_scaling.scaling_summary(runs)}
    mh = by["1 multihost, pinned"]
    assert mh["paired_throughput_ratio"] == 0.85 and mh["paired_throughput_ratio_range"] == [0.8, 0.9]
    assert mh["paired_postgres_cpu_ratio"] == 1.3 and mh["paired_postgres_cpu_ratio_range"] == [1.1, 1.5]
    assert "paired_throughput_ratio" not in by["standalone, pinned"]
    assert "over 3 runs" in output._paired(mh) and output._paired({**mh, "runs": 1}) == ""


def test_load_balance_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import datetime, timedelta

    t0 = datetime(2026, 12, 6, 20, 0, 0)

    def row(instance: int, shard: int | None, n: int, start_s: float, end_s: float) -> dict[str, Any]:
        return {"claimed_by": instance, "run_by_shard": shard, "n": n,
                "first_start": t0 + timedelta(seconds=start_s), "last_end": t0 + timedelta(seconds=end_s)}

    rows = [  # instance ids 7 (rejoined as 9) and 8, shards 0 and 1; 1,000 tasks; 99 of no runner
        row(7, 0, 300, 0.5, 8), row(9, 0, 50, 8.5, 9), row(7, 1, 150, 0.0, 6),
        row(8, 0, 250, 0.2, 10), row(8, 1, 250, 0.1, 7), row(99, 0, 500, 0.0, 30),
    ]
    monkeypatch.setattr(mh_scaling, "fetch_rows", lambda conn, sql: rows)
    out = mh_scaling.load_balance(None, [[7, 9], [8]], 1000, 10.0)
    assert out["tasks_per_shard"] == [350, 250, 250, 150]
    assert out["busiest_shard_load"] == 1.4  # 350 against an even 250
    assert out["idle_tail_share"] == 0.1  # the first instance's last end at 9 s, the run's at 10 s, of 10 s
    assert mh_scaling.load_balance(None, [[7, 9], [8]], 1000, None)["idle_tail_share"] is None
    # A third instance that ran nothing: its shards count 0, and it sat idle from the first start.
    out = mh_scaling.load_balance(None, [[7, 9], [8], [11]], 1000, 10.0)
    assert out["tasks_per_shard"] == [350, 250, 250, 150, 0, 0]
    assert out["idle_tail_share"] == 1.0
    # One instance: no tail; a task without a shard (never started by one) is its own row.
    monkeypatch.setattr(mh_scaling, "fetch_rows", lambda conn, sql: [row(7, 0, 400, 0, 5), row(7, None, 100, 1, 2)])
    out = mh_scaling.load_balance(None, [[7]], 500, 5.0)
    assert out["tasks_per_shard"] == [400, 100] and out["idle_tail_share"] == 0.0
    monkeypatch.setattr(mh_scaling, "fetch_rows", lambda conn, sql: [])
    assert mh_scaling.load_balance(None, [[7], [8]], 500, 5.0) == {
        "tasks_per_shard": [0, 0, 0, 0], "busiest_shard_load": None, "idle_tail_share": None}


def test_target_rows() -> None:
    def setup(mode: str, n: int, vs: float, pg: float | None, spread: float | None) -> dict[str, Any]:
        return {"mode": mode, "instances": n, "routing": "hash", "throughput_vs_standalone": vs,
                "postgres_cpu_vs_standalone": pg, "share_spread": spread}

    results = {"settings": {"multihost": {"lease_seconds": 30.0, "lease_renew_interval": 2.0}},
               "scaling": {"routings": ["hash"], "summary": [
                   setup("standalone", 1, 1.0, 1.0, None), setup("multihost", 1, 0.9, 1.2, 0.0),
                   setup("multihost", 3, 0.85, 1.6, 0.2)]},
               "takeover": {"summary": {"first_task_s": {"max": 31.0}, "all_partitions_s": {"max": 31.5}}},
               "join": {"summary": {"first_task_s": {"max": 4.5}}}}
    rows = {t.split(" (")[0]: (m, ok) for t, m, ok in output.target_rows(results)}
    assert rows["one multihost instance >= 0.8x standalone"] == ("0.90x", True)
    assert rows["3 instances together >= 0.8x standalone, each within 15 % of an even share"][1] is False
    assert rows["PostgreSQL CPU per task in multihost <= 1.5x standalone"][1] is False
    assert rows["takeover after kill -9 <= lease + one renewal interval"][1] is True
    assert rows["a joining instance runs its first task within two renewal intervals"][1] is False


def test_bad_arguments_are_refused_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--set", "no.such=1"], ["--set", "multihost.lease_seconds=3"], ["--repeats", "0"],
                 ["--scale-repeats", "0"], ["--instances", "5"], ["--quick", "--full"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv
    assert "lease_renew_interval" in capsys.readouterr().err  # 2 s renewals do not fit three times in 3 s


# -- the smoke run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-multihost") / "smoke.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "bench.multihost", "--smoke", "--no-progress", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, f"bench.multihost exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    results: dict[str, Any] = json.loads(out.read_text())
    results["_stdout"] = proc.stdout
    return results


@pytest.mark.slow
def test_smoke_takeover_moves_every_partition_and_keeps_the_contract(smoke: dict[str, Any]) -> None:
    assert smoke["kind"] == "multihost" and smoke["suite"] == "smoke" and smoke["ok"]
    assert smoke["settings"]["defaults"] is False  # the smoke run's short lease is not the default
    assert smoke["settings"]["multihost"]["lease_seconds"] == 3.0
    takeover = smoke["takeover"]
    assert takeover["ok"] and len(takeover["runs"]) == 1
    run = takeover["runs"][0]
    assert run["error"] is None and run["victim_processes_gone"]
    assert run["partitions_at_kill"] >= 1 and run["partitions_moved"] == run["partitions_at_kill"]
    assert all(run["checks"].values()), run["checks"]
    assert run["ended_once"]["ok"] and run["order"]["ok"]
    # No task of a moved partition may start elsewhere before its partition moved.
    assert 0 < run["first_partition_s"] <= run["first_task_s"]
    assert 0 <= run["kill_jitter_s"] <= 1.0  # one renewal interval of the smoke run's settings
    assert run["first_partition_s"] <= run["all_partitions_s"]
    assert run["survivor_exit_codes"] == [0]
    for name in ("first_partition_s", "first_task_s", "all_partitions_s"):
        assert takeover["summary"][name]["n"] == 1


@pytest.mark.slow
def test_smoke_scaling_runs_every_setup(smoke: dict[str, Any]) -> None:
    scaling = smoke["scaling"]
    assert scaling["ok"]
    assert [r["setup"] for r in scaling["summary"]] == ["standalone, pinned", "1 multihost, pinned",
                                                        "2 multihost, pinned"]
    assert "compete for the same" in scaling["note"]
    for run in scaling["runs"]:
        assert run["ok"], run.get("error")
        assert run["throughput_tps"] > 0
        assert sum(run["tasks_per_instance"]) == 400 and len(run["tasks_per_instance"]) == run["instances"]
        assert run["cpu"]["taskomatic_s_per_1k"] >= 0 and run["cpu"]["postgres_s_per_1k"] >= 0
        assert run["exit_codes"] == [0] * run["instances"]
        assert ("partition_acquisitions" in run) == (run["mode"] == "multihost")
        assert run["db_transactions_per_task"] > 0
        assert run["pauses"]["longest_s"] >= 0
        # Every task is counted on the shard that ran it; the busiest shard has at least an even share.
        assert sum(run["tasks_per_shard"]) == 400
        assert len(run["tasks_per_shard"]) == run["shards_per_instance"] * run["instances"]
        assert run["busiest_shard_load"] >= 1.0
        assert 0.0 <= run["idle_tail_share"] < 1.0 and (run["instances"] > 1 or run["idle_tail_share"] == 0.0)


@pytest.mark.slow
def test_smoke_output(smoke: dict[str, Any]) -> None:
    machine = smoke["machine"]
    for key in ("cpu_model", "cores", "memory_kb", "kernel", "python", "postgresql", "commit"):
        assert machine[key], key
    out = smoke["_stdout"]
    assert "1. Takeover after kill -9" in out and "2. Scaling over instances" in out
    assert "(a) another instance holds its first partition" in out and "3. Join and leave under load" in out
    assert "| standalone, pinned" in out and "| 2 multihost, pinned" in out
    assert "Targets (issue 13):" in out


@pytest.mark.slow
def test_smoke_join_balances_and_hands_back(smoke: dict[str, Any]) -> None:
    join = smoke["join"]
    assert join["ok"] and len(join["runs"]) == 1
    run = join["runs"][0]
    assert all(run["checks"].values()), run["checks"]
    assert 0 <= run["first_partition_s"] <= run["even_share_s"]
    assert run["first_task_s"] >= run["first_partition_s"]
    assert run["all_back_after_leave_s"] >= 0 and run["ended_once"]["reruns"] == 0


@pytest.mark.slow
def test_smoke_workloads_report_makespan_against_each_setups_bound(smoke: dict[str, Any]) -> None:
    workloads = smoke["workloads"]
    assert workloads["ok"]
    assert [w["name"] for w in workloads["workloads"]] == ["fixed20-zipf"]
    rows = workloads["summary"]
    assert [r["setup"] for r in rows] == ["standalone, pinned", "1 multihost, pinned", "2 multihost, pinned"]
    for run in workloads["runs"]:
        assert run["ok"], run.get("error")
        assert sum(run["tasks_per_instance"]) == 100
        # 2 shards per instance: the bound is the hottest key's chain or all work over 2n shards.
        assert run["lower_bound_s"] > 0 and run["makespan_ratio"] >= 1.0
    assert "4. Workloads over instances" in smoke["_stdout"] and "fixed20-zipf: 100 tasks" in smoke["_stdout"]


def test_mix_summary_groups_by_workload_with_ratios_to_its_own_standalone() -> None:
    from bench.multihost.mixes import mix_summary

    def run(workload: str, mode: str, n: int, tps: float, ratio: float | None) -> dict[str, Any]:
        return {"setup": mh_scaling.setup_label(n, mode == "multihost", "hash"), "mode": mode, "instances": n,
                "routing": "hash", "ok": True, "throughput_tps": tps, "workload": workload,
                "makespan_s": 2.0, "makespan_ratio": ratio, "cpu": {"postgres_s_per_1k": 0.1},
                "share_per_instance": [1.0 / n] * n}

    rows = mix_summary([run("a", "standalone", 1, 100.0, 1.2), run("a", "multihost", 2, 150.0, 1.5),
                        run("b", "standalone", 1, 10.0, None), run("b", "multihost", 2, 5.0, None)])
    assert [(r["workload"], r["setup"]) for r in rows] == [
        ("a", "standalone, hash"), ("a", "2 multihost, hash"), ("b", "standalone, hash"), ("b", "2 multihost, hash")]
    assert [r["throughput_vs_standalone"] for r in rows] == [1.0, 1.5, 1.0, 0.5]
    assert [r["makespan_ratio"] for r in rows] == [1.2, 1.5, None, None]
