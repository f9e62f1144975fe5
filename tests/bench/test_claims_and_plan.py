"""The capacity planner (``bench/plan.py``, pure: answers checked by hand) and the claim benchmark
(``bench/claims.py``, run small against a private PostgreSQL; its figures are never asserted)."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import plan, queueing
from bench.plan import PlanError, Workload
from bench.queueing import Service

REPO = Path(__file__).resolve().parents[2]


def workload(per_hour: float = 3600.0, latency: float = 0.5, cv: float = 1.0, overhead: float = 0.0,
             vms: int = 1000, skew: str = "uniform") -> Workload:
    return Workload(tasks_per_hour={"start_vm": per_hour}, latency_s={"start_vm": latency}, latency_cv=cv,
                    overhead_s=overhead, vms=vms, skew=skew)


# -- queueing formulas, by hand ---------------------------------------------------------


def test_mm1_wait_and_p95_by_hand() -> None:
    # 1 task/s, exponential 0.5 s: rho = 0.5, E[S²] = 2·0.25 = 0.5, W = 0.5·0.5/(2·0.5) = 0.5 s.
    service = workload().service()
    assert service.mean_s == pytest.approx(0.5)
    assert service.second_moment_s2 == pytest.approx(0.5)
    assert service.cv == pytest.approx(1.0)
    assert queueing.mg1_mean_wait(1.0, service) == pytest.approx(0.5)
    # M/M/1: P(wait > t) = rho·exp(-(μ - λ) t) = 0.5·exp(-t): p95 = ln(0.5/0.05) = ln 10.
    assert queueing.p95_wait(1.0, service) == pytest.approx(math.log(10))
    wait = queueing.mgc_wait(1, 1.0, service)
    assert wait is not None and wait.probability == pytest.approx(0.5) and wait.mean_s == pytest.approx(0.5)


def test_md1_and_limits() -> None:
    service = Service(mean_s=0.2, second_moment_s2=0.04)  # deterministic 0.2 s
    # λ = 2: rho = 0.4, W = 2·0.04/(2·0.6) = 1/15 s; the c = 1 case of Allen-Cunneen is Pollaczek-Khinchine exactly.
    assert queueing.mg1_mean_wait(2.0, service) == pytest.approx(1 / 15)
    wait = queueing.mgc_wait(1, 2.0, service)
    assert wait is not None and wait.mean_s == pytest.approx(1 / 15)
    assert queueing.mg1_mean_wait(5.0, service) is None  # rho = 1
    assert queueing.p95_wait(5.0, service) is None
    assert queueing.mgc_wait(3, 15.0, service) is None  # a = 3 erlangs on 3 servers
    assert queueing.p95_wait(0.2, service) == 0.0  # rho = 0.04 <= 5 %: 95 % of tasks do not wait at all


def test_erlang_c_against_textbook_values() -> None:
    # M/M/1: P(wait) = rho.
    assert queueing.erlang_c(1, 0.3) == pytest.approx(0.3)
    # M/M/2: P(wait) = 2 rho² / (1 + rho); rho = 0.5 (a = 1): 1/3.
    assert queueing.erlang_c(2, 1.0) == pytest.approx(1 / 3)
    for rho in (0.1, 0.5, 0.9):
        assert queueing.erlang_c(2, 2 * rho) == pytest.approx(2 * rho ** 2 / (1 + rho))
    # c = 10, a = 8 erlangs: 0.4092 (the closed form, a^c/c!·c/(c-a) over the sum plus that).
    assert queueing.erlang_c(10, 8.0) == pytest.approx(0.40918, abs=1e-5)
    for c, a in ((10, 8.0), (5, 1.5), (30, 27.3)):
        top = a ** c / math.factorial(c) * c / (c - a)
        assert queueing.erlang_c(c, a) == pytest.approx(top / (sum(a ** k / math.factorial(k) for k in range(c)) + top))
    assert queueing.erlang_c(4, 0.0) == 0.0 and queueing.erlang_c(4, 4.0) == 1.0
    # Stable where factorials overflow a float; falls with c at a fixed load.
    assert 0.0 < queueing.erlang_c(500, 480.0) < 1.0
    assert queueing.erlang_c(10, 8.0) > queueing.erlang_c(11, 8.0) > queueing.erlang_c(12, 8.0)


def test_mmc_and_allen_cunneen_by_hand() -> None:
    # M/M/2, λ = 1, E[S] = 1: C = 1/3, Wq = C/(cμ - λ) = 1/3 s; a waiting task waits Exp(mean 1 s).
    exponential = Service(mean_s=1.0, second_moment_s2=2.0)
    wait = queueing.mgc_wait(2, 1.0, exponential)
    assert wait is not None
    assert wait.probability == pytest.approx(1 / 3) and wait.mean_s == pytest.approx(1 / 3)
    assert wait.quantile() == pytest.approx(math.log((1 / 3) / 0.05))
    assert queueing.p95_wait(1.0, exponential, servers=2) == pytest.approx(math.log(20 / 3))
    # Deterministic service (Cs² = 0): Allen-Cunneen halves the M/M/c wait; cv 2 multiplies it by 2.5.
    fixed = queueing.mgc_wait(2, 1.0, Service(mean_s=1.0, second_moment_s2=1.0))
    spread = queueing.mgc_wait(2, 1.0, Service(mean_s=1.0, second_moment_s2=5.0))
    assert fixed is not None and spread is not None
    assert fixed.mean_s == pytest.approx(1 / 6) and spread.mean_s == pytest.approx(2.5 / 3)


def test_p95_of_a_sum_of_waits() -> None:
    never, one = queueing.NO_WAIT, queueing.Wait(1.0, 1.0)
    assert queueing.sum_quantile(never, one) == pytest.approx(math.log(20))
    assert queueing.sum_quantile(one, never) == pytest.approx(math.log(20))
    # Two Exp(1): Erlang-2, P(> t) = e^-t (1 + t) = 0.05 at t = 4.7439.
    assert queueing.sum_quantile(one, one) == pytest.approx(4.743865, rel=1e-6)
    # Exp(1) + Exp(mean 2): P(> t) = 2 e^(-t/2) - e^-t.
    t = queueing.sum_quantile(one, queueing.Wait(1.0, 2.0))
    assert 2 * math.exp(-t / 2) - math.exp(-t) == pytest.approx(0.05)
    # Atoms at 0 too, against a simulation.
    first, second = queueing.Wait(0.3, 2.0), queueing.Wait(0.6, 0.5)
    rng = random.Random(7)
    draws = sorted((rng.expovariate(1 / 2.0) if rng.random() < 0.3 else 0.0)
                   + (rng.expovariate(1 / 0.5) if rng.random() < 0.6 else 0.0) for _ in range(200_000))
    assert queueing.sum_quantile(first, second) == pytest.approx(draws[int(0.95 * len(draws))], rel=0.03)
    assert queueing.sum_quantile(first, second) >= max(first.quantile(), second.quantile())


def test_overhead_adds_to_service_time() -> None:
    service = workload(latency=0.5, cv=0.0, overhead=0.1).service()
    assert service.mean_s == pytest.approx(0.6)
    assert service.second_moment_s2 == pytest.approx(0.36)


# -- keys ---------------------------------------------------------------------------------


def test_uniform_keys_share_the_rate() -> None:
    w = workload(per_hour=3600.0, vms=10)
    rates = plan.key_rates(w)
    assert sorted(rates) == list(range(1, 11))
    assert all(r == pytest.approx(0.1) for r in rates.values())
    groups = plan.key_groups(rates, w.service())
    assert len(groups) == 1 and groups[0][0] == pytest.approx(1.0)


def test_zipf_keys_are_deterministic_and_skewed() -> None:
    w = workload(vms=100, skew="zipf:1.1")
    first, second = plan.key_rates(w), plan.key_rates(w)
    assert first == second
    ranked = sorted(first.values(), reverse=True)
    assert ranked[0] / ranked[1] == pytest.approx(2 ** 1.1)
    assert sum(ranked) == pytest.approx(1.0)


# -- answers ----------------------------------------------------------------------------------


def test_one_shard_suffices_when_its_m_m_1_p95_meets_the_target() -> None:
    # One shard: rho 0.5, p95 ln 10 = 2.30 s.
    assert plan.plan(workload(), target_p95_s=2.4).shards == 1
    # Just under: two shards form an M/M/2 pool, rho 0.25: C = 2·0.25²/1.25 = 0.1, a waiting task waits
    # Exp(mean E[S]/(c - a) = 1/3 s): p95 = ln(0.1/0.05)/3 = 0.23 s.
    result = plan.plan(workload(), target_p95_s=2.2)
    assert result.shards == 2 and result.pool_shards == 2
    assert result.rows[0].pool_p95_wait_s == pytest.approx(math.log(10))
    assert result.rows[0].limited_by == "pool"
    assert result.rows[1].wait_probability == pytest.approx(0.1)
    assert result.rows[1].pool_p95_wait_s == pytest.approx(math.log(2) / 3)
    assert result.instances == 1


def test_capacity_alone_by_hand() -> None:
    # 3 tasks/s x 0.5 s = 1.5 shards of work over 1,000 uniform keys: one shard overflows, two share it (rho 0.75).
    result = plan.plan(workload(per_hour=3 * 3600), target_p95_s=1e6)
    assert result.offered_load == pytest.approx(1.5)
    assert result.rows[0].utilisation == pytest.approx(1.5) and result.rows[0].limited_by == "capacity"
    assert result.rows[0].pool_p95_wait_s is None and result.rows[0].overall_p95_wait_s is None
    assert result.shards == 2 and result.rows[1].utilisation == pytest.approx(0.75)


def test_instances_from_shards_per_instance() -> None:
    # 20 tasks/s x 0.5 s = 10 erlangs: at least 11 shards, the instances' shards one pool.
    result = plan.plan(workload(per_hour=20 * 3600), target_p95_s=1e6, shards_per_instance=4)
    assert result.shards == 11
    assert result.instances == math.ceil(11 / 4)


def test_a_hot_key_over_one_shard_is_impossible() -> None:
    # Zipf s=2 over 10 VMs: the hottest key has 1/H(10,2) = 64.5 % of 2 tasks/s x 1 s = utilisation 1.29.
    result = plan.plan(workload(per_hour=7200, latency=1.0, vms=10, skew="zipf:2"), target_p95_s=60)
    assert result.shards is None and result.instances is None
    assert result.hottest_key_utilisation == pytest.approx(2 / sum(1 / r ** 2 for r in range(1, 11)))
    assert result.verdict.startswith(f"impossible: key {result.hottest_key} alone needs more than one shard")
    assert "no number of shards helps" in result.verdict and "would have to arrive at under" in result.verdict
    # The pool has room (a = 2 erlangs), but the key's own queue never drains: no count meets the target.
    assert all(not r.meets_target and r.hottest_key_p95_wait_s is None for r in result.rows)
    assert any(r.pool_p95_wait_s == 0.0 for r in result.rows)
    # The slower rate it names: one key of exponential 1 s tasks, p95 = (1/(1 - rho)) ln(rho/0.05) = 60 s.
    rho = result.hottest_key_max_per_hour / 3600
    assert math.log(rho / 0.05) / (1 - rho) == pytest.approx(60, rel=1e-6)
    assert "impossible" in plan.render(result, "test")


def test_a_hot_key_whose_own_queue_misses_the_target_is_impossible() -> None:
    # The same hot key at a quarter of the rate: utilisation 0.32, but it waits behind itself.
    w = workload(per_hour=1800, latency=1.0, vms=10, skew="zipf:2")
    result = plan.plan(w, target_p95_s=0.1)
    assert result.shards is None
    assert result.hottest_key_alone_p95_s is not None and result.hottest_key_alone_p95_s > 0.1
    assert "even with a shard always free" in result.verdict
    assert result.hottest_key_max_per_hour < result.hottest_key_per_hour
    ok = plan.plan(w, target_p95_s=100)
    assert ok.shards is not None and ok.hottest_key_max_per_hour > ok.hottest_key_per_hour


def test_a_hot_key_can_need_more_than_enough_shards() -> None:
    # 1.5 tasks/s of 1 s tasks over 20 keys, zipf 1.5: the pool alone meets 10 s with 2 shards, but the hottest
    # key (rho 0.69) waits behind its own tasks and on top of that for the pool: it needs a third shard.
    result = plan.plan(workload(per_hour=5400, latency=1.0, vms=20, skew="zipf:1.5"), target_p95_s=10)
    assert result.pool_shards == 2 and result.shards == 3
    two = result.rows[1]
    assert two.pool_p95_wait_s is not None and two.pool_p95_wait_s <= 10
    assert two.limited_by == "hottest key" and two.hottest_key_p95_wait_s is not None
    assert two.hottest_key_p95_wait_s > 10
    assert "set by the hottest key" in result.verdict
    # Uniform keys of the same load: no key matters, the pool decides.
    uniform = plan.plan(workload(per_hour=5400, latency=1.0, vms=20), target_p95_s=10)
    assert uniform.shards == uniform.pool_shards == 2


def test_all_tasks_p95_lies_between_the_pool_and_the_hottest_key() -> None:
    result = plan.plan(workload(per_hour=5400, latency=1.0, vms=20, skew="zipf:1.5"), target_p95_s=10)
    for row in result.rows[1:]:
        assert row.pool_p95_wait_s is not None and row.hottest_key_p95_wait_s is not None
        assert row.overall_p95_wait_s is not None
        assert row.pool_p95_wait_s <= row.overall_p95_wait_s <= row.hottest_key_p95_wait_s


def test_more_load_needs_more_shards() -> None:
    answers = [plan.plan(workload(per_hour=rate, vms=2000), target_p95_s=2.0).shards
               for rate in (1800, 3600, 7200, 14400, 28800, 57600)]
    assert None not in answers
    assert answers == sorted(answers)
    assert answers[-1] > answers[0]
    # Pooling: the shards needed grow about like the load (a = λ E[S]) plus a margin, not with the hottest key's hash.
    assert answers[-1] >= 57600 / 3600 * 0.5


def test_the_pool_wait_falls_with_shards() -> None:
    w = workload(per_hour=14400, vms=2000)
    rows = [plan.evaluate(w, c, 1.0) for c in range(3, 12)]
    p95s = [r.pool_p95_wait_s for r in rows]
    assert None not in p95s
    assert p95s == sorted(p95s, key=lambda v: -(v or 0))
    assert rows[0].wait_probability > rows[-1].wait_probability


def test_monotone_in_the_target() -> None:
    w = workload(per_hour=14400, vms=2000)
    answers = [plan.plan(w, target_p95_s=t).shards for t in (0.01, 0.1, 0.5, 2.0, 20.0)]
    assert None not in answers
    assert answers == sorted(answers, key=lambda n: -(n or 0))
    assert answers[0] > answers[-1]


def test_bad_inputs() -> None:
    with pytest.raises(PlanError, match="no --latency for migrate_vm"):
        plan.plan(Workload({"migrate_vm": 1.0}, {}, 1.0, 0.0, 10, "uniform"), 1.0)
    with pytest.raises(PlanError, match="bad skew"):
        plan.parse_skew("pareto")
    with pytest.raises(PlanError):
        plan.parse_pairs("start_vm", "--latency")
    assert plan.parse_pairs("start_vm=3000, migrate_vm=2.5", "x") == {"start_vm": 3000.0, "migrate_vm": 2.5}


def test_overhead_from_a_results_json(tmp_path: Path) -> None:
    burst = {"arrival": "burst", "key_distribution": "uniform"}
    noop_only = {"workloads": [{"name": "noop-uniform", "latency": "noop", **burst},
                               {"name": "noop-steady", "latency": "noop", "arrival": "steady",
                                "key_distribution": "uniform"},
                               {"name": "noop-zipf", "latency": "noop", "arrival": "burst",
                                "key_distribution": "zipf"}],
                 "runs": [{"workload": "noop-uniform", "runner": "taskomatic", "parallelism": 1,
                           "throughput_tps": 1000.0, "complete": True},
                          {"workload": "noop-uniform", "runner": "taskomatic", "parallelism": 4,
                           "throughput_tps": 2000.0, "complete": True},
                          {"workload": "noop-uniform", "runner": "pool", "parallelism": 4,
                           "throughput_tps": 100.0, "complete": True},
                          # limited by their arrival rate or a hot key: not a shard's overhead
                          {"workload": "noop-steady", "runner": "taskomatic", "parallelism": 4,
                           "throughput_tps": 25.0, "complete": True},
                          {"workload": "noop-zipf", "runner": "taskomatic", "parallelism": 4,
                           "throughput_tps": 300.0, "complete": True}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(noop_only))
    overhead, source = plan.overhead_from_results(path)
    assert overhead == pytest.approx(0.002)  # 4 shards / 2,000 per s: the larger of 1 ms and 2 ms
    assert "2 no-op burst runs" in source and "understates" in source
    timed = {**noop_only,
             "workloads": [*noop_only["workloads"], {"name": "sleep20-uniform", "latency": "fixed", "tasks": 2000,
                                                     "total_work_s": 40.0, **burst}],
             "runs": [*noop_only["runs"], {"workload": "sleep20-uniform", "runner": "taskomatic", "parallelism": 4,
                                           "makespan_s": 11.0, "complete": True}]}
    path.write_text(json.dumps(timed))
    overhead, source = plan.overhead_from_results(path)
    assert overhead == pytest.approx((4 * 11.0 - 40.0) / 2000)  # 2 ms per task besides the 20 ms action
    assert "fixed-latency burst runs" in source
    path.write_text(json.dumps({"workloads": [], "runs": []}))
    with pytest.raises(PlanError):
        plan.overhead_from_results(path)


def test_overhead_counts_pinned_runs_only_and_reads_gzipped_results(tmp_path: Path) -> None:
    burst = {"arrival": "burst", "key_distribution": "uniform"}
    run = {"workload": "sleep20-uniform", "runner": "taskomatic", "parallelism": 4, "complete": True}
    results = {"workloads": [{"name": "sleep20-uniform", "latency": "fixed", "tasks": 2000, "total_work_s": 40.0,
                              **burst}],
               # hash routing's makespan also holds its shards' uneven load: not a per-task overhead
               "runs": [{**run, "routing": "pinned", "makespan_s": 11.0},
                        {**run, "routing": "hash", "makespan_s": 16.0}]}
    path = tmp_path / "results.json.gz"
    path.write_bytes(gzip.compress(json.dumps(results).encode()))
    overhead, source = plan.overhead_from_results(path)
    assert overhead == pytest.approx((4 * 11.0 - 40.0) / 2000)
    assert "the largest over 1 fixed-latency burst runs" in source
    only_hash = {**results, "runs": results["runs"][1:]}
    path.write_bytes(gzip.compress(json.dumps(only_hash).encode()))
    with pytest.raises(PlanError):
        plan.overhead_from_results(path)


def test_cli_prints_model_table_and_answer(capsys: pytest.CaptureFixture[str]) -> None:
    code = plan.main(["--tasks-per-hour", "start_vm=3600", "--latency", "start_vm=0.5", "--vms", "1000",
                      "--target-p95", "2.4", "--overhead-ms", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Pollaczek" in out and "Erlang C" in out and "Allen-Cunneen" in out and "M/G/c" in out
    assert "| 1 | 1 | 0.500 |" in out
    assert "Answer: 1 shard, 1 instance" in out
    code = plan.main(["--tasks-per-hour", "a=7200", "--latency", "a=1", "--vms", "10", "--skew", "zipf:2",
                      "--target-p95", "5", "--overhead-ms", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 2
    assert data["shards"] is None and data["verdict"].startswith("impossible")


# -- the claim benchmark, small ---------------------------------------------------------------


@pytest.fixture(scope="module")
def claims(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-claims")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "bench.claims", "--finished", "20000", "--batches", "5",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, f"bench.claims exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "full / empty" in proc.stdout
    data: dict[str, Any] = json.loads((out / "claims.json").read_text())
    return data


@pytest.mark.slow
def test_claims_measures_both_tables(claims: dict[str, Any]) -> None:
    assert claims["empty"]["finished_rows"] == 0
    assert claims["full"]["finished_rows"] == 20000
    for label in ("empty", "full"):
        case = claims[label]
        assert case["claimed_per_s"] > 0
        assert case["claimed"] == 5 * 200
        assert case["batches"] == 5
    assert claims["ratio_full_to_empty"] > 0
    assert claims["machine"]["cores"] >= 1


@pytest.mark.slow
def test_claims_plan_reads_the_partial_index(claims: dict[str, Any]) -> None:
    assert claims["uses_claimable_index"] is True
    for label in ("empty", "full"):
        explain = claims[label]["explain"]
        assert explain["claim_scan"]["index"] == "tasks_claimable_idx"
        assert explain["claim_scan"]["actual_rows"] == 200
        assert explain["top_node"] == "ModifyTable"
        assert "tasks_claimable_idx" in explain["text"]
