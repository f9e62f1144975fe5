"""The queue's named queries on a real PostgreSQL: claiming, starting, ending, cancel.

Each query is run exactly as the daemon runs it, through ``Store`` and the
blocks of ``queries.sql``. Two ``Store`` objects are two database sessions,
which is how concurrency between fetchers/instances is reproduced.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from taskomatic.db.queries import query as named_query
from taskomatic.db.store import Store
from taskomatic.runtime.instance import INSTANCE_LOCK_ID
from tests.helpers import query, wait_for
from tests.integration.conftest import StoreFactory


@pytest.fixture
def store(stores: StoreFactory) -> Store:
    return stores()


def register(store: Store, pid: int = 1234, mode: str = "standalone") -> int:
    with store.transaction():
        instance_id = store.scalar("register_instance", hostname="testhost", pid=pid, version="test",
                                   mode=mode, shards=2, lease=None if mode == "standalone" else 30.0)
    assert isinstance(instance_id, int)
    return instance_id


def submit(dsn: str, n: int, target_type: str = "Vm", action: str = "start_vm") -> list[int]:
    rows = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                      "SELECT %s, g, %s FROM generate_series(1, %s) g RETURNING id", (target_type, action, n))
    return sorted(r["id"] for r in rows)


def claim(store: Store, instance_id: int, limit: int) -> list[int]:
    with store.transaction():
        rows = store.all("claim_tasks", instance_id=instance_id, limit=limit)
    return sorted(r["id"] for r in rows)


def row(dsn: str, task_id: int) -> dict[str, Any]:
    return query(dsn, "SELECT * FROM tasks WHERE id = %s", (task_id,))[0]


def now() -> datetime:
    return datetime.now(UTC)


def start(store: Store, task_id: int, instance_id: int) -> bool:
    with store.transaction():
        return store.one("mark_running", shard=0, task_ids=[task_id], instance_id=instance_id,
                         time_started=now()) is not None


def finish(store: Store, task_id: int, instance_id: int, state: str = "finished",
           message: str | None = None) -> bool:
    with store.transaction():
        return store.one("record_outcome", task_id=task_id, instance_id=instance_id, state=state,
                         message=message, time_started=None, time_ended=now()) is not None


def cancel(store: Store, task_id: int) -> bool:
    with store.transaction():
        return store.one("cancel_task", task_id=task_id, message="canceled by test") is not None


# -- instances ------------------------------------------------------------------------------

def test_register_instance_gives_fresh_ids(dsn: str, store: Store) -> None:
    first = register(store)
    second = register(store)
    assert second > first
    rows = query(dsn, "SELECT id, hostname, mode, shards, started_at FROM instances ORDER BY id")
    assert [r["id"] for r in rows] == [first, second]
    assert rows[0]["hostname"] == "testhost" and rows[0]["shards"] == 2 and rows[0]["started_at"] is not None


# -- claiming -------------------------------------------------------------------------------

def test_claim_returns_the_oldest_n_and_marks_them(dsn: str, store: Store) -> None:
    me = register(store)
    ids = submit(dsn, 10)

    with store.transaction():
        rows = store.all("claim_tasks", instance_id=me, limit=4)
    assert sorted(r["id"] for r in rows) == ids[:4]
    # Everything a shard needs comes back with the claim.
    first = min(rows, key=lambda r: r["id"])
    assert first["action"] == "start_vm" and first["task_target_type"] == "Vm"
    assert first["args"] == {} and first["state"] == "queued"
    assert (first["key_type"], first["key_id"]) == ("Vm", first["task_target_id"])

    for task_id in ids[:4]:
        r = row(dsn, task_id)
        assert r["claimed_by"] == me and r["claimed_at"] is not None and r["state"] == "queued"
    for task_id in ids[4:]:
        assert row(dsn, task_id)["claimed_by"] is None


def test_second_claim_does_not_return_claimed_tasks(dsn: str, store: Store) -> None:
    me = register(store)
    ids = submit(dsn, 7)
    assert claim(store, me, 4) == ids[:4]
    assert claim(store, me, 4) == ids[4:]
    assert claim(store, me, 4) == []
    more = submit(dsn, 2)
    assert claim(store, me, 4) == more


def test_claim_skips_tasks_that_are_not_queued(dsn: str, store: Store) -> None:
    me = register(store)
    ids = submit(dsn, 5)
    query(dsn, "UPDATE tasks SET state = 'finished' WHERE id = %s", (ids[0],))
    query(dsn, "UPDATE tasks SET state = 'canceled' WHERE id = %s", (ids[1],))
    assert claim(store, me, 10) == ids[2:]


def test_claim_does_not_take_tasks_another_instance_holds(dsn: str, stores: StoreFactory) -> None:
    a, b = stores(), stores()
    ia, ib = register(a), register(b)
    ids = submit(dsn, 6)
    assert claim(a, ia, 3) == ids[:3]
    assert claim(b, ib, 10) == ids[3:]
    assert claim(a, ia, 10) == []


def test_uncommitted_claim_is_skipped_not_waited_for(dsn: str, stores: StoreFactory) -> None:
    """SKIP LOCKED: a claim in flight on one session neither blocks nor is duplicated by another."""
    a, b = stores(), stores()
    ia, ib = register(a), register(b)
    ids = submit(dsn, 10)

    got_a = sorted(r["id"] for r in a.all("claim_tasks", instance_id=ia, limit=3))  # not committed yet
    assert got_a == ids[:3]
    with b.conn.cursor() as cur:
        cur.execute("SET LOCAL lock_timeout = '5s'")  # a regression to a blocking claim fails, not hangs
    got_b = claim(b, ib, 100)
    assert got_b == ids[3:]
    a.commit()
    assert {r["claimed_by"] for r in query(dsn, "SELECT claimed_by FROM tasks")} == {ia, ib}


def test_concurrent_claimers_never_share_a_task_and_together_get_all(dsn: str, stores: StoreFactory) -> None:
    total = 600
    ids = submit(dsn, total)
    workers = 4
    sessions = [stores() for _ in range(workers)]
    instance_ids = [register(s) for s in sessions]
    got: list[list[int]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def work(i: int) -> None:
        try:
            barrier.wait(10)
            while True:
                batch = claim(sessions[i], instance_ids[i], 7)
                if not batch:
                    return
                got[i].extend(batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a claimer did not finish"
    assert not errors, errors

    claimed = [task_id for batch in got for task_id in batch]
    assert len(claimed) == len(set(claimed)), "a task was claimed twice"
    assert sorted(claimed) == ids
    # The database agrees with what each claimer was told.
    holders = {r["id"]: r["claimed_by"] for r in query(dsn, "SELECT id, claimed_by FROM tasks")}
    for i, batch in enumerate(got):
        assert all(holders[task_id] == instance_ids[i] for task_id in batch)


# -- the claim stays O(batch) -----------------------------------------------------------------

def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def test_claim_plan_uses_the_partial_index_not_a_seq_scan(dsn: str, store: Store) -> None:
    query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, state, time_started, time_ended) "
               "SELECT 'Vm', g % 500, 'start_vm', 'finished', clock_timestamp(), clock_timestamp() "
               "FROM generate_series(1, 100000) g")
    queued = submit(dsn, 5)
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("ANALYZE tasks")
            sql = cur.mogrify(named_query("claim_tasks"), {"instance_id": 1, "limit": 200}).decode()
            cur.execute("EXPLAIN (FORMAT JSON) " + sql)
            plan = cur.fetchone()[0][0]["Plan"]  # type: ignore[index]
    finally:
        conn.close()

    nodes = list(_plan_nodes(plan))
    on_partial = [n for n in nodes if n.get("Index Name") == "tasks_claimable_idx"]
    assert any(n["Node Type"] in ("Index Scan", "Index Only Scan") for n in on_partial), (
        f"claim does not scan tasks_claimable_idx: {[(n['Node Type'], n.get('Index Name')) for n in nodes]}")
    seq_on_tasks = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks"]
    assert not seq_on_tasks, f"claim reads the whole tasks table: {nodes}"

    # And it still claims the right rows among 100,000 finished ones.
    me = register(store)
    assert claim(store, me, 200) == queued


# -- starting, ending, fencing ---------------------------------------------------------------

def test_mark_running_starts_a_claimed_task_once(dsn: str, store: Store) -> None:
    me = register(store)
    [task_id] = submit(dsn, 1)
    assert not start(store, task_id, me), "an unclaimed task must not start"
    claim(store, me, 1)
    assert start(store, task_id, me)
    r = row(dsn, task_id)
    assert r["state"] == "running" and r["time_started"] is not None and r["attempts"] == 1
    assert not start(store, task_id, me), "a running task must not start again"


def test_mark_running_refuses_a_canceled_task(dsn: str, store: Store) -> None:
    me = register(store)
    [task_id] = submit(dsn, 1)
    claim(store, me, 1)
    assert cancel(store, task_id)
    assert not start(store, task_id, me)
    r = row(dsn, task_id)
    assert r["state"] == "canceled" and r["time_started"] is None and r["attempts"] == 0


def test_mark_running_refuses_a_task_claimed_by_another_instance(dsn: str, stores: StoreFactory) -> None:
    a, b = stores(), stores()
    ia, ib = register(a), register(b)
    [task_id] = submit(dsn, 1)
    claim(a, ia, 1)
    assert not start(b, task_id, ib)
    assert row(dsn, task_id)["state"] == "queued"
    assert start(a, task_id, ia)


def test_record_outcome_only_by_the_holder(dsn: str, stores: StoreFactory) -> None:
    a, b = stores(), stores()
    ia, ib = register(a), register(b)
    [task_id] = submit(dsn, 1)
    claim(a, ia, 1)
    assert start(a, task_id, ia)

    # Another instance takes the claim over (a's lease expired / it is gone).
    with b.transaction():
        assert b.run("adopt_orphaned_claims", instance_id=ib) == 1
    # The old holder is fenced off...
    assert not finish(a, task_id, ia, message="late result")
    r = row(dsn, task_id)
    assert r["state"] == "running" and r["message"] is None and r["time_ended"] is None
    # ...the new one writes the outcome, once.
    assert finish(b, task_id, ib, state="failed", message="domain not found")
    assert not finish(b, task_id, ib, state="finished")
    r = row(dsn, task_id)
    assert r["state"] == "failed" and r["message"] == "domain not found" and r["time_ended"] is not None


def test_record_outcome_refuses_a_task_that_is_not_running(dsn: str, store: Store) -> None:
    me = register(store)
    [task_id] = submit(dsn, 1)
    claim(store, me, 1)
    assert not finish(store, task_id, me), "a queued (never started) task cannot end"
    assert row(dsn, task_id)["state"] == "queued"


def test_record_outcome_keeps_microsecond_times(dsn: str, store: Store) -> None:
    me = register(store)
    [task_id] = submit(dsn, 1)
    claim(store, me, 1)
    started = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    ended = datetime(2024, 5, 1, 12, 0, 1, 654321, tzinfo=UTC)
    with store.transaction():
        assert store.one("mark_running", shard=0, task_ids=[task_id], instance_id=me, time_started=started)
    with store.transaction():
        assert store.one("record_outcome", task_id=task_id, instance_id=me, state="finished", message=None,
                         time_started=None, time_ended=ended)
    r = row(dsn, task_id)
    assert r["time_started"] == started and r["time_ended"] == ended and r["state"] == "finished"


def test_failed_outcome_without_message_is_refused_by_the_database(dsn: str, store: Store) -> None:
    me = register(store)
    [task_id] = submit(dsn, 1)
    claim(store, me, 1)
    start(store, task_id, me)
    with pytest.raises(psycopg2.errors.CheckViolation):
        finish(store, task_id, me, state="failed", message=None)
    assert row(dsn, task_id)["state"] == "running"


# -- cancel -------------------------------------------------------------------------------------

def test_cancel_a_queued_unclaimed_task(dsn: str, store: Store) -> None:
    me = register(store)
    [task_id, other] = submit(dsn, 2)
    assert cancel(store, task_id)
    r = row(dsn, task_id)
    assert r["state"] == "canceled" and r["time_ended"] is not None and r["message"] == "canceled by test"
    # A canceled task is never claimed.
    assert claim(store, me, 10) == [other]
    assert not cancel(store, task_id), "canceling twice must report nothing canceled"


def test_cancel_a_queued_claimed_task(dsn: str, store: Store) -> None:
    me = register(store)
    [task_id] = submit(dsn, 1)
    claim(store, me, 1)
    assert cancel(store, task_id)
    assert row(dsn, task_id)["state"] == "canceled"
    # It is no longer something this instance holds.
    assert store.all("held_tasks", instance_id=me) == []
    store.rollback()


def test_cancel_refuses_running_and_finished_tasks(dsn: str, store: Store) -> None:
    me = register(store)
    running, finished, failed = submit(dsn, 3)
    claim(store, me, 3)
    for task_id in (running, finished, failed):
        assert start(store, task_id, me)
    assert finish(store, finished, me)
    assert finish(store, failed, me, state="failed", message="boom")

    for task_id, state in ((running, "running"), (finished, "finished"), (failed, "failed")):
        assert not cancel(store, task_id), f"a {state} task was canceled"
        assert row(dsn, task_id)["state"] == state
    assert not cancel(store, 999_999_999)


# -- holding, handing back, adopting ---------------------------------------------------------

def test_held_tasks_lists_claimed_unfinished_tasks_in_id_order(dsn: str, stores: StoreFactory) -> None:
    a, b = stores(), stores()
    ia, ib = register(a), register(b)
    ids = submit(dsn, 6)
    claim(a, ia, 4)
    claim(b, ib, 2)
    start(a, ids[1], ia)
    start(a, ids[2], ia)
    finish(a, ids[2], ia)

    held = a.all("held_tasks", instance_id=ia)
    a.rollback()
    assert [r["id"] for r in held] == [ids[0], ids[1], ids[3]]
    assert [r["state"] for r in held] == ["queued", "running", "queued"]
    assert {"task_target_type", "task_target_id", "action", "args", "key_type", "key_id"} <= set(held[0])


def test_release_unstarted_hands_back_only_queued_tasks(dsn: str, stores: StoreFactory) -> None:
    a, b = stores(), stores()
    ia, ib = register(a), register(b)
    ids = submit(dsn, 5)
    assert claim(a, ia, 4) == ids[:4]
    assert claim(b, ib, 1) == ids[4:]
    assert start(a, ids[0], ia)

    with a.transaction():
        assert a.run("release_unstarted", instance_id=ia) == 3

    states = {r["id"]: r for r in query(dsn, "SELECT id, state, claimed_by, claimed_at FROM tasks")}
    assert states[ids[0]]["claimed_by"] == ia and states[ids[0]]["state"] == "running"
    for task_id in ids[1:4]:
        assert states[task_id]["claimed_by"] is None and states[task_id]["claimed_at"] is None
        assert states[task_id]["state"] == "queued"
    assert states[ids[4]]["claimed_by"] == ib, "another instance's claim was released"
    # Released tasks keep their place: the next claim gets them, oldest first.
    assert claim(b, ib, 2) == ids[1:3]


def test_adopt_orphaned_claims_takes_every_unfinished_claim(dsn: str, stores: StoreFactory) -> None:
    old, new = stores(), stores()
    i_old = register(old)
    ids = submit(dsn, 4)
    claim(old, i_old, 4)
    start(old, ids[0], i_old)
    start(old, ids[1], i_old)
    finish(old, ids[1], i_old)
    i_new = register(new)

    with new.transaction():
        assert new.run("adopt_orphaned_claims", instance_id=i_new) == 3
    held = new.all("held_tasks", instance_id=i_new)
    new.rollback()
    assert [r["id"] for r in held] == [ids[0], ids[2], ids[3]]
    assert row(dsn, ids[1])["claimed_by"] == i_old, "a finished task's history was rewritten"
    # The old instance can no longer start or end any of them.
    assert not start(old, ids[2], i_old)
    assert not finish(old, ids[0], i_old)
    with new.transaction():
        assert new.run("adopt_orphaned_claims", instance_id=i_new) == 0


def test_task_states_reports_state_and_holder(dsn: str, store: Store) -> None:
    me = register(store)
    a, b, c = submit(dsn, 3)
    claim(store, me, 1)
    cancel(store, c)
    rows = store.all("task_states", ids=[a, b, c, 999_999_999])
    store.rollback()
    assert {r["id"]: (r["state"], r["claimed_by"]) for r in rows} == {
        a: ("queued", me), b: ("queued", None), c: ("canceled", None)}


def test_fail_unstartable_fails_a_held_task_with_its_message(dsn: str, stores: StoreFactory) -> None:
    a, b = stores(), stores()
    ia, ib = register(a), register(b)
    ids = submit(dsn, 2)
    claim(a, ia, 2)
    t = now()

    with b.transaction():
        assert b.one("fail_unstartable", task_id=ids[0], instance_id=ib, message="x", time=t) is None
    with a.transaction():
        assert a.one("fail_unstartable", task_id=ids[0], instance_id=ia,
                     message="unknown action 'frobnicate'", time=t) is not None
    r = row(dsn, ids[0])
    assert r["state"] == "failed" and r["message"] == "unknown action 'frobnicate'"
    assert r["time_started"] == t and r["time_ended"] == t
    # Only once: an ended task cannot be failed again.
    with a.transaction():
        assert a.one("fail_unstartable", task_id=ids[0], instance_id=ia, message="again", time=t) is None
    assert row(dsn, ids[0])["message"] == "unknown action 'frobnicate'"
    # A running task can be failed too (it cannot be parsed after a restart, say).
    start(a, ids[1], ia)
    with a.transaction():
        assert a.one("fail_unstartable", task_id=ids[1], instance_id=ia, message="bad args", time=t)
    assert row(dsn, ids[1])["state"] == "failed"


# -- the standalone guard ---------------------------------------------------------------------

def _guard(store: Store, name: str = "try_standalone_guard") -> bool:
    granted = bool(store.scalar(name, lock_id=INSTANCE_LOCK_ID))
    store.commit()  # session-level lock: survives the transaction
    return granted


def test_standalone_guard_is_exclusive_until_the_holder_disconnects(stores: StoreFactory) -> None:
    holder, other = stores(), stores()
    assert _guard(holder)
    assert not _guard(other)
    assert not _guard(other, "try_multihost_guard"), "a multihost instance joined a standalone one"
    assert _guard(holder), "the holder itself must still hold it"

    holder.close()  # the backend exits, which releases the session lock
    wait_for(lambda: _guard(other), timeout=10, what="the guard to be granted after the holder left")
    third = stores()
    assert not _guard(third)


def test_multihost_guard_is_shared_but_excludes_standalone(stores: StoreFactory) -> None:
    m1, m2, s = stores(), stores(), stores()
    assert _guard(m1, "try_multihost_guard")
    assert _guard(m2, "try_multihost_guard")
    assert not _guard(s)
    m1.close()
    assert not _guard(s), "one multihost instance is still there"
    m2.close()
    wait_for(lambda: _guard(s), timeout=10, what="the standalone guard once multihost instances left")
