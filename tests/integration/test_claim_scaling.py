"""Claiming stays O(batch): the rows a claim reads do not grow with the queue.

Counted, not timed: EXPLAIN ANALYZE reports how many rows each plan node
produced; over 100,000 queued tasks on 2,000 keys (and finished history),
the multihost claim over the partitions an instance holds must read about as
many task rows as it returns (plus one index descent per held partition),
however many tasks wait.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg2
import pytest

from taskomatic.db import migrate
from taskomatic.db import partitions as dbp
from taskomatic.db.queries import query as named_query
from taskomatic.db.store import Store
from taskomatic.runtime.partition_book import PartitionBook

QUEUED, KEYS, FINISHED = 100_000, 2_000, 20_000
UNANALYSED = 300_000  # well below this many, the planner picks the index scan even without statistics


@pytest.fixture
def big_queue(dsn: str) -> str:
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action, state, message) "
                    "SELECT 'Vm', g %% %s + 1, 'start_vm', 'finished', NULL FROM generate_series(1, %s) g",
                    (KEYS, FINISHED))
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action) "
                    "SELECT 'Vm', g %% %s + 1, 'start_vm' FROM generate_series(1, %s) g", (KEYS, QUEUED))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("ANALYZE tasks")
    conn.close()
    return dsn


def task_rows_read(store: Store, name: str, params: dict[str, Any]) -> int:
    """Rows the plan's nodes on ``tasks`` produced, over all their loops."""
    with store.conn.cursor() as cur:
        if name.startswith("claim_partition_"):
            cur.execute(named_query("claim_partition_planner"))  # as db.partitions runs it
        cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + named_query(name), params)
        plan = cur.fetchone()[0]
    store.rollback()
    if isinstance(plan, str):
        plan = json.loads(plan)

    def walk(node: dict[str, Any]) -> int:
        own = node["Actual Rows"] * node["Actual Loops"] if node.get("Relation Name") == "tasks" else 0
        return own + sum(walk(child) for child in node.get("Plans", []))

    return walk(plan[0]["Plan"])


def _instance_holding(store: Store, partitions: range) -> tuple[int, dict[int, int]]:
    """A multihost instance registered, and the leases it acquired: (its id, partition -> token)."""
    with store.transaction():
        instance = int(store.scalar("register_instance", hostname="h", pid=1, version="t", mode="multihost",
                                    shards=4, lease=60.0))
    with store.transaction():
        return instance, {a.partition: a.token for a in dbp.acquire_partitions(store, instance, partitions)}


def test_a_multihost_claim_over_held_partitions_reads_a_batch_not_the_queue(big_queue: str) -> None:
    store = Store.open(big_queue, "test_claim_scaling")
    try:
        instance, held = _instance_holding(store, range(0, 256, 3))
        assert len(held) == 86  # a third of P, as with three instances
        pairs = sorted(held.items())
        book = PartitionBook(256)
        for partition, token in pairs:
            book.hold(partition, token)
        per_partition = book.per_partition(200)  # what the fetcher asks for
        caps = book.claim_caps(200)
        claim = {"instance_id": instance, "partitions": [p for p, _ in pairs], "tokens": [t for _, t in pairs],
                 "caps": [caps[p] for p, _ in pairs], "limit": 200}
        read = task_rows_read(store, "claim_partition_tasks", claim)
        print("claim_partition_tasks read", read)
        # Offered: at most per_partition of each held partition; then the 200 picked are updated.
        assert read <= per_partition * len(held) + 2 * 200, read
    finally:
        store.close()


def test_the_window_claim_of_an_instance_holding_every_partition_reads_its_batch(big_queue: str) -> None:
    """One instance holding all P: the fetcher's id-order claim reads the window (here the batch itself)
    through tasks_claimable_idx and updates what it picked, nothing like the 100,000 queued."""
    store = Store.open(big_queue, "test_claim_scaling")
    try:
        instance, held = _instance_holding(store, range(256))
        book = PartitionBook(256)
        for partition, token in held.items():
            book.hold(partition, token)
        window = book.claim_window(200)  # what the fetcher asks for
        assert window == 200
        pairs = sorted(held.items())
        claim = {"instance_id": instance, "partitions": [p for p, _ in pairs], "tokens": [t for _, t in pairs],
                 "window": window, "limit": 200}
        read = task_rows_read(store, "claim_partition_window", claim)
        print("claim_partition_window read", read)
        # The window's rows, then the picked ones found by id and updated (the plan's two nodes on tasks).
        assert read <= window + 2 * 200, read
    finally:
        store.close()


@pytest.mark.slow
def test_a_standalone_claim_reads_a_batch_before_the_table_was_ever_analysed(empty_dsn: str) -> None:
    """A bulk insert the planner has no statistics for yet (a new database, autovacuum not
    run): the claim still walks tasks_claimable_idx in id order and stops after its batch.
    (Without claim_settings the planner expects a few queued rows, bitmap-scans all of
    them and sorts: every claim then reads the whole queue.)"""
    dsn = empty_dsn
    conn = psycopg2.connect(dsn)
    migrate.upgrade(conn)
    conn.commit()
    with conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE tasks SET (autovacuum_enabled = false)")
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action) "
                    "SELECT 'Vm', g %% %s + 1, 'start_vm' FROM generate_series(1, %s) g", (KEYS, UNANALYSED))
    conn.close()
    store = Store.open(dsn, "test_claim_scaling")
    try:
        with store.transaction():
            instance = store.scalar("register_instance", hostname="h", pid=1, version="t", mode="standalone",
                                    shards=4, lease=None)
        store.one("claim_settings")  # as the fetcher does, first in the claim's transaction
        read = task_rows_read(store, "claim_tasks", {"instance_id": instance, "limit": 200})
    finally:
        store.close()
    # 200 picked through the index, 200 joined back for the UPDATE: nothing like the 100,000 queued.
    assert read <= 1_000, f"the claim read {read} task rows of {UNANALYSED} queued"
