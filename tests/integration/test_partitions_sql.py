"""Partitions in the database: P recorded once, the trigger's partition, Python and SQL agreeing,
the migration converting existing rows, and the claim reading only its batch."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskomatic.db import migrate
from taskomatic.db import partitions as db_partitions
from taskomatic.db.store import Store
from taskomatic.model import OrderingKey
from taskomatic.partitions import DEFAULT_PARTITIONS, partition_of
from tests.helpers import query


@pytest.fixture
def store(dsn: str) -> Iterator[Store]:
    store = Store.open(dsn, "partition tests")
    store.conn.autocommit = True
    yield store
    store.close()


def sql_partition(store: Store, kind: str, ident: int, partitions: int) -> int:
    with store.conn.cursor() as cur:
        cur.execute("SELECT taskomatic_partition_of(%s, %s, %s)", (kind, ident, partitions))
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def test_p_is_recorded_once_and_fixed(store: Store, dsn: str) -> None:
    assert db_partitions.partition_count(store) == DEFAULT_PARTITIONS
    leases = db_partitions.partition_view(store)
    assert [lease.partition for lease in leases] == list(range(DEFAULT_PARTITIONS))
    assert all(lease.instance_id is None and lease.token == 0 and not lease.holder_live for lease in leases)
    with pytest.raises(psycopg2.errors.RestrictViolation):
        query(dsn, "UPDATE cluster_settings SET partitions = 64")
    with pytest.raises(psycopg2.errors.UniqueViolation):
        query(dsn, "INSERT INTO cluster_settings (partitions) VALUES (64)")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["Vm", "StoragePool", "Host"]) | st.text(min_size=1, max_size=12).filter(
           lambda t: "\x00" not in t),
       ident=st.integers(-(2**63), 2**63 - 1), partitions=st.sampled_from([1, 2, 3, 7, 256, 1000, 32767]))
def test_python_and_sql_agree(store: Store, kind: str, ident: int, partitions: int) -> None:
    assert sql_partition(store, kind, ident, partitions) == partition_of(OrderingKey(kind, ident), partitions)


def test_the_insert_trigger_sets_the_partition_of_the_ordering_key(dsn: str) -> None:
    pool = query(dsn, "INSERT INTO storage_pools (name) VALUES ('p') RETURNING id")[0]["id"]
    volume = query(dsn, "INSERT INTO storage_volumes (storage_pool_id, name) VALUES (%s, 'v') RETURNING id",
                   (pool,))[0]["id"]
    rows = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES "
                      "('Vm', 7, 'start_vm'), ('StorageVolume', %s, 'delete_volume'), ('Host', NULL, 'x') "
                      "RETURNING id, key_type, key_id, partition", (volume,))
    assert [(r["key_type"], r["key_id"]) for r in rows] == [("Vm", 7), ("StoragePool", pool), ("Host", -rows[2]["id"])]
    for r in rows:
        assert r["partition"] == partition_of(OrderingKey(r["key_type"], r["key_id"]), DEFAULT_PARTITIONS)
    # What an INSERT says about the partition does not count: the key decides.
    forced = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, partition) "
                        "VALUES ('Vm', 7, 'start_vm', 3) RETURNING partition")[0]
    assert forced["partition"] == rows[0]["partition"]


def test_the_migration_partitions_existing_tasks(empty_dsn: str) -> None:
    conn = psycopg2.connect(empty_dsn)
    try:
        earlier = [m for m in migrate.available_migrations() if m.version < 8]
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                        "applied_at timestamptz NOT NULL DEFAULT clock_timestamp())")
            for m in earlier:
                cur.execute(m.sql)
                cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name))
            cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action) "
                        "SELECT 'Vm', i, 'start_vm' FROM generate_series(1, 500) i")
            cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Host', NULL, 'x')")
        conn.commit()
        applied = migrate.upgrade(conn)
        assert applied[0].version == 8
    finally:
        conn.close()
    rows = query(empty_dsn, "SELECT key_type, key_id, partition FROM tasks")
    assert len(rows) == 501
    for r in rows:
        assert r["partition"] == partition_of(OrderingKey(r["key_type"], r["key_id"]), DEFAULT_PARTITIONS), r


@pytest.mark.parametrize("analysed", [True, False], ids=["analysed", "statistics-before-the-burst"])
def test_the_claim_reads_its_batch_not_the_queue(store: Store, dsn: str, analysed: bool) -> None:
    """20,000 queued tasks over 2,000 VMs, an instance holding half the partitions: the claim
    descends the index once per held partition and reads a bounded number of rows per partition,
    with fresh statistics and with none (a burst the planner has not seen: the plan must not
    depend on them)."""
    query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
               "SELECT 'Vm', 1 + i % 2000, 'start_vm' FROM generate_series(1, 20000) i")
    if analysed:
        query(dsn, "ANALYZE tasks")
    instance = query(dsn, "INSERT INTO instances (hostname, pid, version, mode, shards, lease_expires_at) "
                          "VALUES ('h', 1, 't', 'multihost', 2, clock_timestamp() + interval '1 hour') "
                          "RETURNING id")[0]["id"]
    store.conn.autocommit = False
    with store.transaction():
        got = db_partitions.acquire_partitions(store, instance, range(0, DEFAULT_PARTITIONS, 2))
    held = {a.partition: a.token for a in got}
    assert len(held) == DEFAULT_PARTITIONS // 2
    planner, statement = _claim_sql()
    with store.conn.cursor() as cur:
        cur.execute(planner)
        cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, {
            "instance_id": instance, "caps": [4] * len(held), "limit": 200,
            "partitions": sorted(held), "tokens": [held[p] for p in sorted(held)]})
        plan = cur.fetchone()[0][0]  # type: ignore[index]
    store.rollback()
    scanned = _rows_read(plan["Plan"], "tasks")
    # At most 4 offered by each held partition, 200 of those picked, then 200 updated by id.
    assert 400 <= scanned <= 200 + 4 * len(held), f"the claim read {scanned} task rows for a batch of 200"
    claimed = query(dsn, "SELECT count(*) AS n FROM tasks WHERE claimed_by IS NOT NULL")[0]["n"]
    assert claimed == 0  # EXPLAIN ANALYZE was rolled back


@pytest.mark.parametrize("analysed", [True, False], ids=["analysed", "statistics-before-the-burst"])
def test_the_window_claim_reads_its_window_not_the_queue(store: Store, dsn: str, analysed: bool) -> None:
    """The id-order claim of an instance holding half the partitions walks the unclaimed tasks by id and
    stops at its window (2 x the batch here), with fresh statistics and with none."""
    from taskomatic.db.queries import query as named

    query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
               "SELECT 'Vm', 1 + i % 2000, 'start_vm' FROM generate_series(1, 20000) i")
    if analysed:
        query(dsn, "ANALYZE tasks")
    instance = _instance(dsn)
    store.conn.autocommit = False
    with store.transaction():
        got = db_partitions.acquire_partitions(store, instance, range(0, DEFAULT_PARTITIONS, 2))
    held = {a.partition: a.token for a in got}
    with store.conn.cursor() as cur:
        cur.execute(named("claim_partition_planner"))
        cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + named("claim_partition_window"), {
            "instance_id": instance, "window": 400, "limit": 200,
            "partitions": sorted(held), "tokens": [held[p] for p in sorted(held)]})
        plan = cur.fetchone()[0][0]  # type: ignore[index]
    store.rollback()
    scanned = _rows_read(plan["Plan"], "tasks")
    # The window's 400 through tasks_claimable_idx, then the picked (at most 200) updated by id.
    assert 400 <= scanned <= 400 + 200, f"the window claim read {scanned} task rows for a window of 400"


def _instance(dsn: str) -> int:
    return int(query(dsn, "INSERT INTO instances (hostname, pid, version, mode, shards, lease_expires_at) "
                          "VALUES ('h', 1, 't', 'multihost', 2, clock_timestamp() + interval '1 hour') "
                          "RETURNING id")[0]["id"])


def test_the_window_claim_takes_the_oldest_of_held_partitions_within_its_window(store: Store, dsn: str) -> None:
    """Oldest first by id, only tasks of partitions held under a current token and not releasing, none
    past the window or the limit; ``scanned`` says how many tasks the window held."""
    keys: dict[int, int] = {}
    for ident in range(1, 400):
        keys.setdefault(partition_of(OrderingKey("Vm", ident), DEFAULT_PARTITIONS), ident)
        if len(keys) == 4:
            break
    (pa, va), (pb, vb), (pc, vc), (_not_held, vd) = sorted(keys.items())
    ids = [query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', %s, 'a') "
                      "RETURNING id", (vm,))[0]["id"] for vm in (vd, va, vb, vc, va, vd, vb, va)]
    instance = _instance(dsn)
    store.conn.autocommit = False
    with store.transaction():
        held = {a.partition: a.token for a in db_partitions.acquire_partitions(store, instance, [pa, pb, pc])}
        db_partitions.begin_release(store, instance, {pc: held[pc]})  # being handed over: not claimed
    # vd's partition is not ours; pc is releasing. The window of 5 holds ids[0..4]: ours are ids[1], [2] and [4].
    with store.transaction():
        rows, scanned = db_partitions.claim_partition_window(store, instance, held, window=5, limit=10)
    assert [r["id"] for r in rows] == [ids[1], ids[2], ids[4]] and scanned == 5
    # A stale token claims nothing of its partition.
    with store.transaction():
        rows, scanned = db_partitions.claim_partition_window(store, instance, {pa: held[pa] - 1, pb: held[pb]},
                                                             window=10, limit=10)
    assert [r["id"] for r in rows] == [ids[6]] and scanned == 5  # ids[0], [3], [5] (not ours), [6], [7] (stale)
    # The limit cuts by id.
    with store.transaction():
        rows, _ = db_partitions.claim_partition_window(store, instance, held, window=10, limit=1)
    assert [r["id"] for r in rows] == [ids[7]]
    # Nothing left of ours: no rows, and still how full the window was (others' tasks at the head).
    with store.transaction():
        assert db_partitions.claim_partition_window(store, instance, held, window=2, limit=10) == ([], 2)
    with store.transaction():
        assert db_partitions.claim_partition_window(store, instance, held, window=10, limit=10) == ([], 3)
    # Once our lease ran out, nothing.
    query(dsn, "UPDATE tasks SET claimed_by = NULL WHERE claimed_by = %s", (instance,))
    query(dsn, "UPDATE instances SET lease_expires_at = clock_timestamp() - interval '1 second' WHERE id = %s",
          (instance,))
    with store.transaction():
        assert db_partitions.claim_partition_window(store, instance, held, window=10, limit=10) == ([], 8)


def _claim_sql() -> tuple[str, str]:
    """The claim's planner settings (run first in its transaction, as db.partitions does) and its statement."""
    from taskomatic.db.queries import query as named

    return named("claim_partition_planner"), named("claim_partition_tasks")


def _rows_read(node: dict, relation: str) -> int:
    """Rows the scans of ``relation`` in a plan produced, over all their loops."""
    own = 0
    if node.get("Relation Name") == relation and "Scan" in node.get("Node Type", ""):
        own = int(node.get("Actual Rows", 0)) * int(node.get("Actual Loops", 1))
    return own + sum(_rows_read(child, relation) for child in node.get("Plans", []))


def test_the_claim_takes_the_oldest_by_id_with_a_cap_per_partition(store: Store, dsn: str) -> None:
    keys = {}
    for ident in range(1, 400):
        keys.setdefault(partition_of(OrderingKey("Vm", ident), DEFAULT_PARTITIONS), ident)
        if len(keys) == 3:
            break
    (pa, va), (pb, vb), (pc, vc) = sorted(keys.items())
    ids = {}
    for n, vm in enumerate((vc, vc, vc, vb, va, vc, va)):
        ids[n] = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', %s, 'a') "
                            "RETURNING id", (vm,))[0]["id"]
    instance = query(dsn, "INSERT INTO instances (hostname, pid, version, mode, shards, lease_expires_at) "
                          "VALUES ('h', 1, 't', 'multihost', 2, clock_timestamp() + interval '1 hour') "
                          "RETURNING id")[0]["id"]
    store.conn.autocommit = False
    with store.transaction():
        held = {a.partition: a.token for a in db_partitions.acquire_partitions(store, instance, [pa, pb, pc])}
    with store.transaction():
        first = db_partitions.claim_partition_tasks(store, instance, held, per_partition=2, limit=3)
    # pc's two oldest (of three waiting), then pb's: by id, not drained partition by partition.
    assert [r["id"] for r in first] == [ids[0], ids[1], ids[3]]
    with store.transaction():
        rest = db_partitions.claim_partition_tasks(store, instance, held, per_partition=1, limit=10)
    # One from each partition that still has work: pc's third, pa's first.
    assert [r["id"] for r in rest] == [ids[2], ids[4]]
    with store.transaction():
        last = db_partitions.claim_partition_tasks(store, instance, held, per_partition=5, limit=10)
    assert [r["id"] for r in last] == [ids[5], ids[6]] and all(r["partition"] in (pa, pc) for r in last)


def test_each_held_partition_can_have_its_own_cap(store: Store, dsn: str) -> None:
    """The fetcher grows the cap of a partition whose claims its cap cut (a hot key): the claim takes up
    to each partition's own cap, still oldest first and at most limit in all."""
    keys = {}
    for ident in range(1, 400):
        keys.setdefault(partition_of(OrderingKey("Vm", ident), DEFAULT_PARTITIONS), ident)
        if len(keys) == 2:
            break
    (hot_p, hot_vm), (cold_p, cold_vm) = keys.items()
    ids: dict[int, list[int]] = {hot_vm: [], cold_vm: []}
    for vm in (hot_vm, cold_vm, hot_vm, hot_vm, cold_vm, hot_vm, hot_vm, cold_vm):
        ids[vm].append(query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                                  "VALUES ('Vm', %s, 'a') RETURNING id", (vm,))[0]["id"])
    instance = query(dsn, "INSERT INTO instances (hostname, pid, version, mode, shards, lease_expires_at) "
                          "VALUES ('h', 1, 't', 'multihost', 2, clock_timestamp() + interval '1 hour') "
                          "RETURNING id")[0]["id"]
    store.conn.autocommit = False
    with store.transaction():
        held = {a.partition: a.token for a in db_partitions.acquire_partitions(store, instance, [hot_p, cold_p])}
    with store.transaction():
        got = db_partitions.claim_partition_tasks(store, instance, held, {hot_p: 4, cold_p: 1}, limit=10)
    assert [r["id"] for r in got] == sorted([*ids[hot_vm][:4], ids[cold_vm][0]])
    with store.transaction():
        got = db_partitions.claim_partition_tasks(store, instance, held, {hot_p: 4, cold_p: 4}, limit=2)
    assert [r["id"] for r in got] == sorted([ids[hot_vm][4], ids[cold_vm][1]])  # oldest first, limit in all


def test_fenced_outcomes_write_each_tasks_own_values_and_only_for_partitions_still_held(store: Store) -> None:
    """record_outcomes_fenced finds each task's values at its position in the arrays (ids in any order)
    and writes nothing for a partition named with a token that is not current."""
    from datetime import UTC, datetime, timedelta

    me = int(store.scalar("register_instance", hostname="h", pid=1, version="test", mode="multihost", shards=2,
                          lease=30))
    store.commit()
    with store.conn.cursor() as cur:
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action, submitted_by) "
                    "SELECT 'Vm', g, 'noop', 'test' FROM generate_series(1, 40) g")
    store.commit()
    held = {a.partition: a.token for a in db_partitions.acquire_partitions(store, me, range(DEFAULT_PARTITIONS))}
    store.commit()
    claimed = db_partitions.claim_partition_tasks(store, me, held, per_partition=40, limit=40)
    store.commit()
    ids = sorted(r["id"] for r in claimed)
    assert len(ids) == 40
    started = datetime(2026, 12, 1, tzinfo=UTC)
    assert db_partitions.mark_running_fenced(store, me, held, ids, 0, started) == ids
    store.commit()
    stale = next(r["partition"] for r in claimed)
    old = {**held, stale: held[stale] - 1}  # a token that is not current: its tasks are not written
    order = ids[::-1]
    outcomes = [db_partitions.Outcome(t, "failed" if t % 2 else "finished", f"task {t}", None,
                                      started + timedelta(seconds=t)) for t in order]
    written = db_partitions.record_outcomes_fenced(store, me, old, outcomes)
    store.commit()
    stale_ids = {r["id"] for r in claimed if r["partition"] == stale}
    assert written == sorted(set(ids) - stale_ids)
    with store.conn.cursor() as cur:
        cur.execute("SELECT id, state, message, time_ended FROM tasks WHERE id = ANY(%s)", (ids,))
        got = {r[0]: r[1:] for r in cur.fetchall()}
    store.rollback()
    for t in ids:
        if t in stale_ids:
            assert got[t] == ("running", None, None)
        else:
            assert got[t] == ("failed" if t % 2 else "finished", f"task {t}", started + timedelta(seconds=t))
