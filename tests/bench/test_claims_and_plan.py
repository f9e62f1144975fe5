"""The capacity planner (``bench/plan.py``, pure: answers checked by hand) and the claim benchmark
(``bench/claims.py``, run small against a private PostgreSQL; its figures are never asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import plan
from bench.plan import PlanError, Service, Workload

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
    assert plan.mg1_mean_wait(1.0, service) == pytest.approx(0.5)
    # M/M/1 exactly: P(W > t) = rho e^{-(μ-λ)t} = 0.5 e^{-t}, so p95 = ln 10.
    assert plan.p95_wait(1.0, service) == pytest.approx(math.log(10))
    assert plan.mixture_p95([1.0], service) == pytest.approx(math.log(10), rel=1e-6)


def test_md1_and_limits() -> None:
    service = Service(mean_s=0.2, second_moment_s2=0.04)  # deterministic 0.2 s
    # λ = 2: rho = 0.4, W = 2·0.04/(2·0.6) = 1/15 s.
    assert plan.mg1_mean_wait(2.0, service) == pytest.approx(1 / 15)
    assert plan.mg1_mean_wait(5.0, service) is None  # rho = 1
    assert plan.p95_wait(5.0, service) is None
    assert plan.p95_wait(0.2, service) == 0.0  # rho = 0.04 <= 5 %: 95 % of tasks do not wait at all
    assert plan.mixture_p95([0.1, 5.0], service) is None


def test_overhead_adds_to_service_time() -> None:
    service = workload(latency=0.5, cv=0.0, overhead=0.1).service()
    assert service.mean_s == pytest.approx(0.6)
    assert service.second_moment_s2 == pytest.approx(0.36)


# -- keys and shards ----------------------------------------------------------------------


def test_uniform_keys_spread_by_the_real_router() -> None:
    from taskomatic.runtime.router import OrderingKey, shard_for

    w = workload(per_hour=3600.0, vms=10)
    rates = plan.key_rates(w)
    assert sorted(rates) == list(range(1, 11))
    assert sum(rates.values()) == pytest.approx(1.0)
    loads = plan.shard_rates(rates, 2)
    on_zero = sum(1 for vm in rates if shard_for(OrderingKey("Vm", vm), 2) == 0)
    assert loads == pytest.approx([on_zero / 10, (10 - on_zero) / 10])


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
    # Just under: a second shard halves each shard's load (p95 about (1/6/0.25)·ln 5 = 1.07 s).
    result = plan.plan(workload(), target_p95_s=2.2)
    assert result.shards == 2
    assert result.rows[0].busiest_p95_wait_s == pytest.approx(math.log(10))
    assert result.instances == 1


def test_capacity_alone_by_hand() -> None:
    # 3 tasks/s x 0.5 s = 1.5 shards of work over 1,000 uniform keys: one shard overflows, two carry ~0.75 each.
    result = plan.plan(workload(per_hour=3 * 3600), target_p95_s=1e6)
    assert result.rows[0].max_utilisation == pytest.approx(1.5)
    assert result.rows[0].busiest_p95_wait_s is None
    assert result.shards == 2


def test_instances_from_shards_per_instance() -> None:
    result = plan.plan(workload(per_hour=20 * 3600), target_p95_s=1e6, shards_per_instance=4)
    assert result.shards is not None and result.shards >= 11
    assert result.instances == math.ceil(result.shards / 4)


def test_a_hot_key_over_one_shard_is_impossible() -> None:
    # Zipf s=2 over 10 VMs: the hottest key has 1/H(10,2) = 64.5 % of 2 tasks/s x 1 s = utilisation 1.29.
    result = plan.plan(workload(per_hour=7200, latency=1.0, vms=10, skew="zipf:2"), target_p95_s=60)
    assert result.shards is None and result.instances is None
    assert result.hottest_key_utilisation == pytest.approx(2 / sum(1 / r ** 2 for r in range(1, 11)))
    assert result.verdict.startswith(f"impossible: key {result.hottest_key} alone needs more than one shard")
    assert "impossible" in plan.render(result, "test")


def test_a_hot_key_whose_own_queue_misses_the_target_is_impossible() -> None:
    # The same hot key at a quarter of the rate: utilisation 0.32, but it waits behind itself.
    w = workload(per_hour=1800, latency=1.0, vms=10, skew="zipf:2")
    result = plan.plan(w, target_p95_s=0.1)
    assert result.shards is None
    assert result.hottest_key_alone_p95_s is not None and result.hottest_key_alone_p95_s > 0.1
    assert "on a shard of its own" in result.verdict
    assert plan.plan(w, target_p95_s=100).shards is not None


def test_more_load_needs_more_shards() -> None:
    answers = [plan.plan(workload(per_hour=rate, vms=2000), target_p95_s=2.0).shards
               for rate in (1800, 3600, 7200, 14400, 28800)]
    assert None not in answers
    assert answers == sorted(answers)
    assert answers[-1] > answers[0]


def test_monotone_in_the_target() -> None:
    w = workload(per_hour=14400, vms=2000)
    answers = [plan.plan(w, target_p95_s=t).shards for t in (0.5, 1.0, 2.0, 5.0, 20.0)]
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
    results = {"workloads": [{"name": "noop-uniform", "latency": "noop"}, {"name": "sleep", "latency": "fixed"}],
               "runs": [{"workload": "noop-uniform", "runner": "taskomatic", "parallelism": 1,
                         "throughput_tps": 1000.0, "complete": True},
                        {"workload": "noop-uniform", "runner": "taskomatic", "parallelism": 4,
                         "throughput_tps": 2000.0, "complete": True},
                        {"workload": "noop-uniform", "runner": "pool", "parallelism": 4,
                         "throughput_tps": 100.0, "complete": True},
                        {"workload": "sleep", "runner": "taskomatic", "parallelism": 4,
                         "throughput_tps": 10.0, "complete": True}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    overhead, source = plan.overhead_from_results(path)
    assert overhead == pytest.approx(0.002)  # 4 shards / 2,000 per s: the larger of 1 ms and 2 ms
    assert "2 no-op taskomatic runs" in source
    path.write_text(json.dumps({"workloads": [], "runs": []}))
    with pytest.raises(PlanError):
        plan.overhead_from_results(path)


def test_cli_prints_model_table_and_answer(capsys: pytest.CaptureFixture[str]) -> None:
    code = plan.main(["--tasks-per-hour", "start_vm=3600", "--latency", "start_vm=0.5", "--vms", "1000",
                      "--target-p95", "2.4", "--overhead-ms", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Pollaczek" in out and "exponential-tail" in out
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


def test_claims_plan_reads_the_partial_index(claims: dict[str, Any]) -> None:
    assert claims["uses_claimable_index"] is True
    for label in ("empty", "full"):
        explain = claims[label]["explain"]
        assert explain["claim_scan"]["index"] == "tasks_claimable_idx"
        assert explain["claim_scan"]["actual_rows"] == 200
        assert explain["top_node"] == "ModifyTable"
        assert "tasks_claimable_idx" in explain["text"]
