"""The planner's model of ``--routing hash``: each shard its own M/G/1 queue (pure functions, hand-computed).

The numbers: 1 task/s, every task exactly 0.5 s (no overhead, cv 0): E[S] = 0.5, E[S²] = 0.25.
* One shard with all of it: rho = 0.5, P(wait) = 0.5, Wq = λ E[S²] / (2 (1 - rho)) = 0.25 s, a waiting
  task's mean wait Wq / rho = 0.5 s, p95 = 0.5 ln(0.5 / 0.05) = 0.5 ln 10 = 1.1513 s.
* A shard with half of it (0.5/s): rho = 0.25, Wq = 0.5 x 0.25 / 1.5 = 0.08333 s, mean if waiting 1/3 s,
  p95 = (1/3) ln(0.25 / 0.05) = (1/3) ln 5 = 0.53648 s.
Keys: with P = 256, Vm:1 is partition 22, Vm:2 is 26 and Vm:4 is 97 (the database's stable hash), so at
2 shards Vm:1 and Vm:2 share shard 0 and Vm:4 is on shard 1; at 3 shards Vm:1 and Vm:2 are on 1 and 2.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from taskomatic.capacity import hashing
from taskomatic.capacity.fleet import Inputs, Request, make_plan
from taskomatic.capacity.model import PlanError, Workload, plan
from taskomatic.model import OrderingKey
from taskomatic.partitions import partition_of

ONE_SHARD_P95 = 0.5 * math.log(10)  # 1.1513
HALF_LOAD_P95 = math.log(5) / 3  # 0.53648


def _workload(*keys: str) -> Workload:
    share = 1.0 / len(keys)
    return Workload(tasks_per_hour={"start_vm": 3600.0}, latency_s={"start_vm": 0.5}, latency_cv=0.0,
                    overhead_s=0.0, vms=len(keys), skew="measured", key_shares=tuple((k, share) for k in keys))


def test_the_keys_partitions_are_the_databases() -> None:
    assert [partition_of(OrderingKey("Vm", i), 256) for i in (1, 2, 4)] == [22, 26, 97]
    assert hashing.ordering_key("Vm:12") == OrderingKey("Vm", 12) and hashing.ordering_key(12) == OrderingKey("Vm", 12)
    assert hashing.ordering_key("StoragePool:3") == OrderingKey("StoragePool", 3)
    assert hashing.ordering_key("no-id") is None and hashing.ordering_key("Vm:x") is None


def test_shard_rates_sum_the_partitions_that_map_to_each_shard() -> None:
    placed = hashing.PartitionRates({"Vm:1": 0.25, "Vm:2": 0.5, "Vm:4": 1.0, "odd": 0.5})
    # 22 and 26 are even, 97 odd; the unplaceable key spreads evenly.
    assert placed.shard_rates(2) == [0.25 + 0.5 + 0.25, 1.0 + 0.25]
    assert placed.shard_rates(3) == pytest.approx([1 / 6, 0.25 + 1.0 + 1 / 6, 0.5 + 1 / 6])  # 22%3=1, 26%3=2, 97%3=1
    assert placed.shard_rates(1) == [2.25]
    assert hashing.key_shard_shares(placed, {"Vm:4": 2.0, "odd": 1.0}, 2) == [0.5, 2.5]


def test_two_keys_on_one_shard_wait_as_if_there_were_one_shard() -> None:
    result = plan(_workload("Vm:1", "Vm:2"), target_p95_s=1.0, routing="hash")
    one, two, three = result.rows
    assert one.pool_p95_wait_s == pytest.approx(ONE_SHARD_P95, rel=1e-9)
    # Both keys hash to shard 0 at 2 shards: the second shard adds nothing.
    assert two.utilisation == pytest.approx(0.5) and two.wait_probability == pytest.approx(0.5)
    assert two.pool_mean_wait_s == pytest.approx(0.25)
    assert two.pool_p95_wait_s == pytest.approx(ONE_SHARD_P95, rel=1e-9)
    assert two.overall_p95_wait_s == pytest.approx(ONE_SHARD_P95, rel=1e-6)
    assert not two.meets_target and two.limited_by == "busiest shard"
    # At 3 shards they are apart: each shard has half the load.
    assert three.utilisation == pytest.approx(0.25) and three.pool_mean_wait_s == pytest.approx(1 / 12)
    assert three.pool_p95_wait_s == pytest.approx(HALF_LOAD_P95, rel=1e-9)
    assert three.hottest_key_p95_wait_s == pytest.approx(HALF_LOAD_P95, rel=1e-9)
    assert three.meets_target and result.shards == 3 and result.routing == "hash"


def test_two_keys_on_two_shards_need_two() -> None:
    result = plan(_workload("Vm:1", "Vm:4"), target_p95_s=1.0, routing="hash")
    assert result.shards == 2
    assert result.rows[-1].pool_p95_wait_s == pytest.approx(HALF_LOAD_P95, rel=1e-9)
    doc = result.to_json()
    assert doc["routing"] == "hash" and doc["partitions"] == 256 and doc["model"].startswith("hash routing")


def test_pinned_is_still_the_pool_model() -> None:
    # Pinned routing: one pool; at 1 shard the pool is the same M/G/1 queue as hash's one shard.
    result = plan(_workload("Vm:1", "Vm:2"), target_p95_s=1.0)
    assert result.routing == "pinned" and result.to_json()["model"].startswith("M/G/c pool")
    assert result.rows[0].pool_p95_wait_s == pytest.approx(ONE_SHARD_P95, rel=1e-9)


def test_unknown_routing_is_refused() -> None:
    with pytest.raises(PlanError, match="routing must be one of"):
        plan(_workload("Vm:1"), target_p95_s=1.0, routing="random")


def test_fleet_waits_under_hash_are_the_keys_shards() -> None:
    request = Request(target_p95_s=1.0, overhead_s=0.0, overhead_source="test", routing="hash")
    fleet = make_plan(Inputs(workload=_workload("Vm:1", "Vm:4")), request)
    assert fleet.at_shards == 2
    (action,) = fleet.action_waits
    assert action["p95_wait_s"] == pytest.approx(HALF_LOAD_P95, rel=1e-6)
    assert action["mean_wait_s"] == pytest.approx(1 / 12)
    assert [k["p95_wait_s"] for k in fleet.hot_keys] == pytest.approx([HALF_LOAD_P95] * 2, rel=1e-6)


def test_plan_command_takes_routing_and_says_which() -> None:
    base = [sys.executable, "-m", "taskomatic", "plan", "--no-history", "--tasks-per-hour", "start_vm=3600",
            "--latency", "start_vm=0.5", "--latency-cv", "0", "--overhead-ms", "0", "--vms", "2",
            "--target-p95", "1", "--json"]
    docs = {}
    for routing in ("pinned", "hash"):
        proc = subprocess.run([*base, "--routing", routing], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr
        docs[routing] = json.loads(proc.stdout)
    assert docs["hash"]["routing"] == "hash" and docs["pinned"]["routing"] == "pinned"
    assert docs["hash"]["model"].startswith("hash routing") and docs["pinned"]["model"].startswith("M/G/c")
    # VMs 1 and 2 share shard 0 at 2 shards (above): hash needs 3, the pool 2.
    assert docs["hash"]["answer"]["shards"] == 3
    assert docs["pinned"]["answer"]["shards"] == 2
