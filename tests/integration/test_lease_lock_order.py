"""Every statement that locks partition lease rows locks them in partition order, on a real PostgreSQL.

Two statements that lock the same rows in different orders can each hold a
row the other waits for: PostgreSQL finds that deadlock only after
deadlock_timeout (1 s) and aborts one. A joining instance's reservation
(request_partitions, an UPDATE that scanned the table in its physical order)
against the holders' claims and fenced writes (FOR SHARE, in join order) did
exactly that, and for that second every shard waiting behind those rows
stopped: the 1.1-1.25 s pause of every instance in bench.multihost's burst
right after a start.

How a statement's order is seen, deterministically: the lease rows' physical
order is shuffled first (as a fleet's updates leave it), one session holds
the row of a middle partition, the statement runs in another and blocks
there; then every row of the statement's set below that partition must be
locked by it already, and none above.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from taskomatic.db import partitions as dbp
from taskomatic.db.store import Store
from tests.helpers import wait_for
from tests.integration.conftest import StoreFactory

SET = [10, 30, 50, 70, 90, 110, 130, 150, 170]  # the partitions the statement locks
BLOCKED_AT = 90  # held by another session: the statement waits there


def _instance(store: Store, host: str) -> int:
    with store.transaction():
        return int(store.scalar("register_instance", hostname=host, pid=1, version="test", mode="multihost",
                                shards=2, lease=3600))


def _shuffle_physical_order(store: Store) -> None:
    """Update every lease row in a random order a few times: a scan then meets them out of partition order."""
    rng = random.Random(11)
    for _ in range(3):
        with store.transaction(), store.conn.cursor() as cur:
            for partition in rng.sample(range(dbp.partition_count(store)), dbp.partition_count(store)):
                cur.execute("UPDATE partition_leases SET acquired_at = acquired_at WHERE partition = %s",
                            (partition,))


def _tasks(store: Store, holder: int, state: str) -> list[int]:
    """One task claimed by ``holder`` in each partition of SET, in ``state``."""
    ids = []
    with store.transaction(), store.conn.cursor() as cur:
        for partition in SET:
            cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action, state, claimed_by) "
                        "SELECT 'Vm', g, 'noop', %s, %s FROM generate_series(1, 5000) g "
                        "WHERE taskomatic_partition_of('Vm', g, 256) = %s LIMIT 1 RETURNING id",
                        (state, holder, partition))
            ids.append(int(cur.fetchone()[0]))  # type: ignore[index]
    return ids


Case = Callable[[Store, int, int, dict[int, int]], Callable[[Store], Any]]


def _claim(store: Store, a: int, b: int, held: dict[int, int]) -> Callable[[Store], Any]:
    _tasks(store, a, "queued")
    with store.transaction(), store.conn.cursor() as cur:
        cur.execute("UPDATE tasks SET claimed_by = NULL")
    return lambda s: dbp.claim_partition_tasks(s, a, {p: held[p] for p in SET}, 2, 200)


def _window_claim(store: Store, a: int, b: int, held: dict[int, int]) -> Callable[[Store], Any]:
    _claim(store, a, b, held)
    return lambda s: dbp.claim_partition_window(s, a, {p: held[p] for p in SET}, 200, 200)


def _start(store: Store, a: int, b: int, held: dict[int, int]) -> Callable[[Store], Any]:
    ids = _tasks(store, a, "queued")
    return lambda s: dbp.mark_running_fenced(s, a, {p: held[p] for p in SET}, ids, 0, dt.datetime.now(dt.UTC))


def _end(store: Store, a: int, b: int, held: dict[int, int]) -> Callable[[Store], Any]:
    ids = _tasks(store, a, "running")
    return lambda s: dbp.record_outcomes_fenced(s, a, {p: held[p] for p in SET},
                                                [dbp.Outcome(i, "finished", None, None, dt.datetime.now(dt.UTC))
                                                 for i in ids])


CASES: dict[str, Case] = {
    "claim_partition_tasks": _claim,
    "claim_partition_window": _window_claim,
    "mark_running_fenced": _start,
    "record_outcomes_fenced": _end,
    "hold_partitions": lambda st, a, b, held: lambda s: dbp.hold_partitions(s, a, {p: held[p] for p in SET}, True),
    "request_partitions": lambda st, a, b, held: lambda s: dbp.request_partitions(s, b, SET),
    "begin_release": lambda st, a, b, held: lambda s: dbp.begin_release(s, a, {p: held[p] for p in SET}),
    "release_partitions": lambda st, a, b, held: lambda s: dbp.release_partitions(s, a, {p: held[p] for p in SET}),
    "release_idle_partitions": lambda st, a, b, held: lambda s: dbp.release_idle_partitions(s, a),
}


def _locked(probe: Store, partitions: list[int]) -> set[int]:
    """Which of these lease rows another session holds a lock on (FOR UPDATE NOWAIT fails)."""
    locked = set()
    for partition in partitions:
        try:
            with probe.conn.cursor() as cur:
                cur.execute("SELECT 1 FROM partition_leases WHERE partition = %s FOR UPDATE NOWAIT", (partition,))
        except psycopg2.errors.LockNotAvailable:
            locked.add(partition)
        probe.rollback()
    return locked


@pytest.mark.parametrize("name", sorted(CASES))
def test_lease_rows_are_locked_in_partition_order(name: str, stores: StoreFactory) -> None:
    # The runner as a shard or fetcher opens its store; the others run statements of their own on .conn.
    setup, blocker, runner, probe = stores(False), stores(False), stores(), stores(False)
    a, b = _instance(setup, "a"), _instance(setup, "b")
    count = dbp.partition_count(setup)
    with setup.transaction():
        held = {x.partition: x.token for x in dbp.acquire_partitions(setup, a, range(count))}
    _shuffle_physical_order(setup)
    statement = CASES[name](setup, a, b, held)
    # The set the statement locks: SET, or every partition of A for the graceful leave.
    touched = list(range(count)) if name == "release_idle_partitions" else SET
    with blocker.conn.cursor() as cur:
        cur.execute("SELECT 1 FROM partition_leases WHERE partition = %s FOR UPDATE", (BLOCKED_AT,))
    with runner.conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        runner_pid = int(cur.fetchone()[0])  # type: ignore[index]
    runner.rollback()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with runner.transaction():
                statement(runner)
        except BaseException as exc:  # reported by the test below
            failure.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        wait_for(lambda: _waiting(probe, runner_pid), 10, 0.01, f"{name} to wait for partition {BLOCKED_AT}")
        locked = _locked(probe, [p for p in touched if p != BLOCKED_AT])
    finally:
        blocker.rollback()
        worker.join(10)
    assert not worker.is_alive() and not failure, failure
    below = {p for p in touched if p < BLOCKED_AT}
    above = {p for p in touched if p > BLOCKED_AT}
    assert locked & above == set(), f"{name} locked {sorted(locked & above)} before {BLOCKED_AT}: not in order"
    assert below <= locked, f"{name} had not locked {sorted(below - locked)} on its way to {BLOCKED_AT}"


def _waiting(probe: Store, pid: int) -> bool:
    with probe.conn.cursor() as cur:
        cur.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = cur.fetchone()
    probe.rollback()
    return bool(row and row[0])
