"""Migration 0011 (key claims go): a database with multihost leftovers loses no task.

Upgraded through 0010 first, then given what an instance of the key-claim era
leaves when it dies: key claims with claimed queued and running tasks. After
0011 the queued ones are back in the queue in their place, the running one
is still claimed (the partition's next holder adopts it to reconcile it),
and the key claims and their index are gone.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import psycopg2.extensions
import pytest

from taskomatic.db import migrate
from taskomatic.db import partitions as dbp
from taskomatic.db.store import Store
from tests.helpers import query


@pytest.fixture
def empty_conn(empty_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    connection = psycopg2.connect(empty_dsn)
    yield connection
    connection.close()


def _instance(dsn: str, mode: str) -> int:
    rows = query(dsn, "INSERT INTO instances (hostname, pid, version, mode, shards, lease_expires_at) "
                      "VALUES ('old', 1, '0.old', %s, 2, clock_timestamp() - interval '1 minute') RETURNING id",
                 (mode,))
    return int(rows[0]["id"])


def _task(dsn: str, vm: int, state: str, holder: int | None) -> int:
    rows = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, state, claimed_by, claimed_at, "
                      "time_started) VALUES ('Vm', %s, 'start_vm', %s, %s, "
                      "CASE WHEN %s::bigint IS NOT NULL THEN clock_timestamp() END, "
                      "CASE WHEN %s = 'running' THEN clock_timestamp() END) RETURNING id",
                 (vm, state, holder, holder, state))
    return int(rows[0]["id"])


def test_key_claim_leftovers_go_back_to_the_queue_or_to_the_next_holder(
        empty_conn: psycopg2.extensions.connection, empty_dsn: str) -> None:
    dsn = empty_dsn
    migrate.upgrade(empty_conn, through=10)
    dead = _instance(dsn, "multihost")
    standalone = _instance(dsn, "standalone")
    running = _task(dsn, 1, "running", dead)
    claimed = [_task(dsn, 1, "queued", dead), _task(dsn, 2, "queued", dead)]
    unclaimed = _task(dsn, 2, "queued", None)
    by_standalone = _task(dsn, 3, "queued", standalone)
    query(dsn, "INSERT INTO key_claims (key_type, key_id, instance_id) VALUES ('Vm', 1, %s), ('Vm', 2, %s) "
               "RETURNING token", (dead, dead))

    applied = migrate.upgrade(empty_conn)
    assert [m.version for m in applied] == [11]

    assert not query(dsn, "SELECT 1 AS x FROM pg_class WHERE relname IN "
                          "('key_claims', 'key_claim_tokens', 'tasks_unclaimed_key_idx')")
    rows = {r["id"]: r for r in query(dsn, "SELECT id, state, claimed_by FROM tasks ORDER BY id")}
    assert set(rows) == {running, *claimed, unclaimed, by_standalone}  # nothing lost
    assert all(rows[t]["claimed_by"] is None and rows[t]["state"] == "queued" for t in [*claimed, unclaimed])
    assert (rows[running]["state"], rows[running]["claimed_by"]) == ("running", dead)
    assert rows[by_standalone]["claimed_by"] == standalone  # a standalone start adopts it, as before

    # The next multihost instance to hold Vm:1's partition adopts the running task to reconcile it.
    store = Store.open(dsn, "test_migration_0011", timeout=10)
    try:
        with store.transaction():
            me = int(store.scalar("register_instance", hostname="new", pid=2, version="new", mode="multihost",
                                  shards=2, lease=30.0))
            partition = int(query(dsn, "SELECT partition FROM tasks WHERE id = %s", (running,))[0]["partition"])
        with store.transaction():
            acquired = dbp.acquire_partitions(store, me, [partition])
            adopted = dbp.adopt_partition_tasks(store, me, [partition])
    finally:
        store.close()
    assert [a.partition for a in acquired] == [partition]
    assert [(r["id"], r["state"]) for r in adopted] == [(running, "running")]
