"""What multihost instances leave in partition_leases, at a standalone start and at a graceful stop.

A standalone instance that starts on a database multihost instances used
frees every partition lease and reservation they left (and adopts their
tasks, as it always did); a multihost instance that stops frees the
partitions with nothing of its own running, keeps the one whose task still
runs (a live instance takes it over once the lease ended), and ends its lease.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from taskomatic.db.store import Store
from taskomatic.model import OrderingKey
from taskomatic.partitions import DEFAULT_PARTITIONS, partition_of
from taskomatic.runtime import instance
from tests.helpers import query


@pytest.fixture
def store(dsn: str) -> Iterator[Store]:
    opened = Store.open(dsn, "test_partition_leftovers", timeout=10)
    yield opened
    opened.close()


def _register(store: Store, mode: str) -> int:
    with store.transaction():
        return int(store.scalar("register_instance", hostname="h", pid=1, version="t", mode=mode, shards=2,
                                lease=30.0 if mode == "multihost" else None))


def _hold(dsn: str, holder: int, vm: int, wanted_by: int | None = None) -> int:
    partition = partition_of(OrderingKey("Vm", vm), DEFAULT_PARTITIONS)
    query(dsn, "UPDATE partition_leases SET instance_id = %s, token = nextval('partition_lease_tokens'), "
               "acquired_at = clock_timestamp(), wanted_by = %s WHERE partition = %s RETURNING partition",
          (holder, wanted_by, partition))
    return partition


def _task(dsn: str, vm: int, state: str, holder: int) -> int:
    return int(query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, state, claimed_by, "
                          "claimed_at, time_started) VALUES ('Vm', %s, 'start_vm', %s, %s, clock_timestamp(), "
                          "CASE WHEN %s = 'running' THEN clock_timestamp() END) RETURNING id",
                     (vm, state, holder, state))[0]["id"])


def test_a_standalone_start_frees_what_multihost_instances_left(dsn: str, store: Store) -> None:
    dead, other = _register(store, "multihost"), _register(store, "multihost")
    _hold(dsn, dead, vm=10, wanted_by=other)
    _hold(dsn, dead, vm=11)
    queued, running = _task(dsn, 10, "queued", dead), _task(dsn, 11, "running", dead)
    query(dsn, "UPDATE instances SET stopped_at = clock_timestamp() RETURNING id")  # all gone
    me = _register(store, "standalone")
    with store.transaction():
        instance.take_over_leftovers(store, me, multihost=False)
    assert query(dsn, "SELECT count(*) AS n FROM partition_leases WHERE instance_id IS NOT NULL "
                      "OR wanted_by IS NOT NULL OR releasing")[0]["n"] == 0
    rows = {r["id"]: r["claimed_by"] for r in query(dsn, "SELECT id, claimed_by FROM tasks")}
    assert rows == {queued: me, running: me}


def test_a_graceful_stop_frees_idle_partitions_and_ends_the_lease(dsn: str, store: Store) -> None:
    me = _register(store, "multihost")
    idle, busy = _hold(dsn, me, vm=10), _hold(dsn, me, vm=11)
    unstarted, still_running = _task(dsn, 10, "queued", me), _task(dsn, 11, "running", me)
    with store.transaction():
        instance.record_stop(store, me, multihost=True)
    held = {r["partition"] for r in query(dsn, "SELECT partition FROM partition_leases WHERE instance_id = %s",
                                          (me,))}
    assert held == {busy} and idle not in held  # the one whose task runs waits for a takeover
    claims = {r["id"]: r["claimed_by"] for r in query(dsn, "SELECT id, claimed_by FROM tasks")}
    assert claims == {unstarted: None, still_running: me}  # the unstarted one is back in the queue
    row = query(dsn, "SELECT stopped_at, lease_expires_at <= clock_timestamp() AS over FROM instances "
                     "WHERE id = %s", (me,))[0]
    assert row["stopped_at"] is not None and row["over"]
