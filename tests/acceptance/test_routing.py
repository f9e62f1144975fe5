"""`--routing hash`: the design's own routing, end to end in the real daemon.

Every key's tasks run on shard partition_of(key) mod N (tasks.run_by_shard says
which slot ran each), per-key order holds, and `--routing pinned` (the default)
is free to spread a key's tasks over any shard.
"""

from __future__ import annotations

from taskomatic.model import OrderingKey
from taskomatic.partitions import partition_of
from tests.acceptance import checks
from tests.helpers import query

SHARDS = 3


def _slots_by_key(dsn: str) -> dict[OrderingKey, set[int]]:
    rows = query(dsn, "SELECT key_type, key_id, run_by_shard FROM tasks WHERE state = 'finished'")
    slots: dict[OrderingKey, set[int]] = {}
    for row in rows:
        slots.setdefault(OrderingKey(row["key_type"], row["key_id"]), set()).add(row["run_by_shard"])
    return slots


def test_hash_routing_runs_each_key_on_its_partitions_shard(dsn: str, noop_daemon) -> None:
    query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
               "SELECT 'Vm', 1 + g % 40, 'noop' FROM generate_series(1, 1200) g")
    partitions = int(query(dsn, "SELECT partitions FROM cluster_settings")[0]["partitions"])
    daemon = noop_daemon(["--routing", "hash"])
    checks.wait_all_ended(dsn, daemon, timeout=120)
    checks.assert_all_ended_once(dsn, single_attempt=True)
    checks.assert_key_order(dsn)
    slots = _slots_by_key(dsn)
    assert len(slots) == 40
    wrong = {key: ran for key, ran in slots.items() if ran != {partition_of(key, partitions) % SHARDS}}
    assert not wrong, f"keys that ran off their hash slot: {wrong}"
    assert len({slot for ran in slots.values() for slot in ran}) > 1  # the keys spread over the shards
