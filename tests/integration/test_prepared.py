"""The hot-path statements as prepared statements (db/store.py), on a real PostgreSQL.

* each of PREPARED_QUERIES prepares (PostgreSQL can type every parameter) and,
  executed through the store, writes what its SQL says;
* the generic plan PostgreSQL settles on after a few executions still reaches
  the tasks by their ids, never by walking the backlog or the history: the
  plans are checked with plan_cache_mode = force_generic_plan;
* a statement prepared in a transaction that rolls back is still there;
* send_with_next: a setting local to the transaction rides with its next
  statement, and is dropped when the transaction ends first.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from taskomatic.db import partitions as dbp
from taskomatic.db import task_writes
from taskomatic.db.store import PREPARED_QUERIES, Store
from tests.helpers import history_then_backlog


@pytest.fixture
def store(dsn: str) -> Iterator[Store]:
    opened = Store.open(dsn, "taskomatic tests", timeout=10)
    yield opened
    opened.close()


def _multihost_instance(store: Store) -> tuple[int, dict[int, int]]:
    with store.transaction():
        me = int(store.scalar("register_instance", hostname="h", pid=1, version="test", mode="multihost",
                              shards=2, lease=3600))
    with store.transaction():
        held = {a.partition: a.token for a in dbp.acquire_partitions(store, me, range(dbp.partition_count(store)))}
    return me, held


def _scans(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node] if node.get("Relation Name") == "tasks" and "Scan" in node["Node Type"] else []
    for child in node.get("Plans", []):
        found.extend(_scans(child))
    return found


def _generic_plan(store: Store, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The plan of a prepared query's EXECUTE with the generic plan forced (run, then rolled back)."""
    text = store.statement_text(name)
    assert text.startswith("EXECUTE "), text
    with store.conn.cursor() as cur:
        cur.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + text, params)
        plan = cur.fetchone()[0][0]["Plan"]  # type: ignore[index]
    store.rollback()
    return plan


def _ended(ids: list[int], ends: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """end_and_start's parameters for the ends (end_ids: task_ids is the starts' name there)."""
    return {"end_ids": ids, **ends}


def test_generic_plans_of_the_hot_statements_reach_tasks_by_id(store: Store) -> None:
    """A big history the statistics describe, a backlog they do not: starting and ending eight tasks
    with the cached generic plans must not walk either."""
    me, held = _multihost_instance(store)
    history_then_backlog(store, me)
    with store.transaction():
        claimed = dbp.claim_partition_tasks(store, me, held, 40, 2000)
    ids = sorted(r["id"] for r in claimed)
    now = dt.datetime.now(dt.UTC)
    with store.transaction():
        task_writes.mark_running(store, me, ids[:1000], now, 0)
    queued, running = ids[1000:1008], ids[:8]
    parts = sorted({r["partition"] for r in claimed if r["id"] in set(queued) | set(running)})
    leases = {"partitions": parts, "tokens": [held[p] for p in parts]}
    ends = {"states": ["finished"] * 8, "messages": [None] * 8, "starts": [None] * 8, "ends": [now] * 8}
    cases = {
        "mark_running": dict(task_ids=queued, instance_id=me, time_started=now, shard=0),
        "record_outcomes": dict(instance_id=me, task_ids=running, **ends),
        "mark_running_fenced": dict(task_ids=queued, instance_id=me, time_started=now, shard=0, **leases),
        "record_outcomes_fenced": dict(instance_id=me, task_ids=running, **ends, **leases),
        "hold_partitions": dict(instance_id=me, starting=True, **leases),
        "end_and_start": dict(instance_id=me, start_ids=queued, time_started=now, shard=0, **_ended(running, ends)),
        "end_and_start_fenced": dict(instance_id=me, start_ids=queued, time_started=now, shard=0, **leases,
                                     **_ended(running, ends)),
    }
    assert set(cases) == PREPARED_QUERIES  # a new prepared query gets its plan checked here
    for name, params in cases.items():
        plan = _generic_plan(store, name, params)
        for scan in _scans(plan):
            assert scan["Node Type"] != "Seq Scan", f"{name} reads the whole table: {scan}"
            assert "id" in scan.get("Index Cond", "").replace("(", " ").split(), (
                f"{name}'s generic plan scans {scan.get('Index Name')} without naming its ids: {scan}")
        buffers = int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks", 0))
        assert buffers < 1000, f"{name}'s generic plan touched {buffers} buffers for 8 tasks"
        if name.startswith(("mark", "record")):
            assert plan["Actual Rows"] == 8, f"{name} wrote {plan['Actual Rows']} of 8 tasks"
        if name.startswith("end_and_start"):
            assert plan["Actual Rows"] == 16, f"{name} ended and started {plan['Actual Rows']} of 8 + 8 tasks"


def test_prepared_writes_do_what_their_sql_says_and_survive_a_rollback(store: Store) -> None:
    me, held = _multihost_instance(store)
    with store.conn.cursor() as cur:
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action) "
                    "SELECT 'Vm', g, 'noop' FROM generate_series(1, 12) g")
    store.commit()
    with store.transaction():
        ids = sorted(r["id"] for r in dbp.claim_partition_tasks(store, me, held, 12, 12))
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(RuntimeError), store.transaction():  # prepared here, then rolled back
        assert sorted(task_writes.mark_running(store, me, ids[:4], now, 1)) == ids[:4]
        raise RuntimeError("roll back")
    with store.transaction():
        assert sorted(task_writes.mark_running(store, me, ids[:4], now, 1)) == ids[:4]
        assert dbp.start_tasks_fenced(store, me, held, ids[4:], 0, now).keys() == set(ids[4:])
    with store.transaction():
        written = task_writes.record_outcomes(store, me, ids[:4], ["finished", "failed"] * 2,
                                              [None, "it broke", None, "again"], [None] * 4, [now] * 4)
        assert written == set(ids[:4])
        stale = {p: t - 1 for p, t in held.items()}  # tokens that are not current: nothing written
        assert dbp.record_outcomes_fenced(store, me, stale, [dbp.Outcome(i, "finished", None, None, now)
                                                            for i in ids[4:]]) == []
        assert dbp.record_outcomes_fenced(store, me, held, [dbp.Outcome(i, "canceled", f"m{i}", None, now)
                                                           for i in ids[4:]]) == ids[4:]
    rows = {r["id"]: r for r in task_writes.task_states(store, ids)}
    store.rollback()
    assert [rows[i]["state"] for i in ids[:4]] == ["finished", "failed"] * 2
    assert all(rows[i]["state"] == "canceled" for i in ids[4:])
    with store.conn.cursor() as cur:
        cur.execute("SELECT name FROM pg_prepared_statements ORDER BY name")
        prepared = {r[0] for r in cur.fetchall()}
    store.rollback()
    assert {"tkm_mark_running", "tkm_record_outcomes", "tkm_mark_running_fenced",
            "tkm_record_outcomes_fenced"} <= prepared


def test_send_with_next_rides_with_the_next_statement_and_ends_with_its_transaction(store: Store) -> None:
    def idle_limit() -> str:
        with store.conn.cursor() as cur:
            cur.execute("SHOW idle_in_transaction_session_timeout")
            return str(cur.fetchone()[0])  # type: ignore[index]

    with store.transaction():
        store.send_with_next("limit_idle_transaction", ms=4321)
        assert store.scalar("partition_count") > 0  # the statement it rides with
        assert idle_limit() == "4321ms"
    assert idle_limit() == "0"  # local to that transaction
    store.rollback()
    with store.transaction():
        store.send_with_next("limit_idle_transaction", ms=1234)
    with store.transaction():  # the transaction ended before another statement: dropped, not carried
        assert store.scalar("partition_count") > 0
        assert idle_limit() == "0"


def test_end_and_start_fenced_ends_in_a_releasing_partition_starts_nothing_there_and_nothing_on_a_stale_token(
        store: Store) -> None:
    me, held = _multihost_instance(store)
    with store.conn.cursor() as cur:
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action) "
                    "VALUES ('Vm', 1, 'noop'), ('Vm', 1, 'noop'), ('Vm', 2, 'noop'), ('Vm', 2, 'noop')")
    store.commit()
    with store.transaction():
        rows = dbp.claim_partition_tasks(store, me, held, 4, 4)
    (one, two, three, four), parts = [r["id"] for r in rows], {r["id"]: r["partition"] for r in rows}
    assert parts[one] == parts[two] and parts[three] == parts[four]
    now = dt.datetime.now(dt.UTC)
    with store.transaction():
        assert set(dbp.start_tasks_fenced(store, me, held, [one, three], 0, now)) == {one, three}
    ends = task_writes.Ends([one, three], ["finished", "finished"], [None, None], [None, None], [now, now])
    stale = {p: t - 1 for p, t in held.items()}
    with store.transaction():
        assert dbp.end_and_start_fenced(store, me, stale, ends, [two, four], 0, now, True) == (set(), {})
    with store.transaction():  # one's partition starts handing over; two was already sent to a shard
        dbp.begin_release(store, me, {parts[one]: held[parts[one]]})
    with store.conn.cursor() as cur:
        cur.execute("UPDATE tasks SET claimed_by = %s WHERE id = %s", (me, two))
    store.commit()
    with store.transaction():
        written, started = dbp.end_and_start_fenced(store, me, held, ends, [two, four], 0, now, True)
    assert written == {one, three}  # a releasing partition still settles what runs
    assert set(started) == {four}  # ...and starts nothing more
