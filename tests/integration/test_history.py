"""History off the hot path (migration 0010, taskomatic/retention.py), on a real PostgreSQL.

* the hot statements (claim, start, outcome) use only indexes they can descend
  by id when the planner's statistics describe nothing but finished history;
* migration 0010 on a database that already holds tasks of every kind;
* retention moves (or deletes) exactly the tasks ended long enough ago, never
  one that has not ended nor a parent with a task still in tasks, one
  instance at a time; the archive is pruned by its own age;
* the capacity planner's history reads the archive too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from taskomatic.db import history, migrate
from taskomatic.db import retention as retention_db
from taskomatic.db.queries import query as named_query
from taskomatic.db.store import Store
from taskomatic.retention import Policy, dry_run, run_pass
from tests.helpers import history_then_backlog, query

DAY = 86400.0
TERMINAL = ("finished", "failed", "canceled")


@pytest.fixture
def store(dsn: str) -> Iterator[Store]:
    opened = Store.open(dsn, "taskomatic tests", timeout=10)
    yield opened
    opened.close()


def _instance(store: Store) -> int:
    instance_id = int(store.scalar("register_instance", hostname="test", pid=1, version="test",
                                   mode="standalone", shards=1, lease=None))
    store.commit()
    return instance_id


def _insert(store: Store, rows: list[dict[str, Any]]) -> list[int]:
    """Tasks with explicit states and ages (ended_days_ago: time_ended that many days ago)."""
    ids = []
    with store.conn.cursor() as cur:
        for row in rows:
            ended = row.get("ended_days_ago")
            cur.execute(
                """INSERT INTO tasks (task_target_type, task_target_id, action, state, message, claimed_by,
                                      parent_task_id, created_at, time_started, time_ended, submitted_by)
                   VALUES ('Vm', %(key)s, 'noop', %(state)s, %(message)s, %(claimed_by)s, %(parent)s,
                           clock_timestamp() - make_interval(days => %(age)s),
                           CASE WHEN %(ended)s::float8 IS NULL THEN NULL
                                ELSE clock_timestamp() - make_interval(secs => %(ended)s::float8 * 86400) END,
                           CASE WHEN %(ended)s::float8 IS NULL THEN NULL
                                ELSE clock_timestamp() - make_interval(secs => %(ended)s::float8 * 86400) END,
                           'test')
                   RETURNING id""",
                {"key": row.get("key", 1), "state": row["state"],
                 "message": "it broke" if row["state"] == "failed" else None,
                 "claimed_by": row.get("claimed_by"), "parent": row.get("parent"),
                 "age": int(row.get("created_days_ago", 10)), "ended": ended})
            ids.append(int(cur.fetchone()[0]))
    store.commit()
    return ids


def _ids(store: Store, table: str) -> set[int]:
    with store.conn.cursor() as cur:
        cur.execute(f"SELECT id FROM {table}")  # a table name from this file
        found = {int(r[0]) for r in cur.fetchall()}
    store.rollback()
    return found


# -- the hot statements' plans -----------------------------------------------------------------


def _index_scans(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node] if node.get("Relation Name") == "tasks" or "Index Name" in node else []
    for child in node.get("Plans", []):
        found.extend(_index_scans(child))
    return found


def _explain(store: Store, name: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """The scans of tasks in the plan of one named statement (run, then rolled back), and its buffers."""
    with store.conn.cursor() as cur:
        sql = cur.mogrify(named_query(name), params).decode()
        cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql)
        plan = cur.fetchone()[0][0]["Plan"]
    store.rollback()
    return _index_scans(plan), int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks", 0))


def test_hot_statements_descend_by_id_when_statistics_only_know_history(dsn: str, store: Store) -> None:
    """With statistics taken when the table held only finished tasks (a big table between two
    analyses), starting and ending a few tasks of a large backlog must not walk the backlog.

    Before migration 0010 mark_running scanned tasks_state_idx (state) for state = 'queued': every
    queued task, to start eight.
    """
    instance_id = _instance(store)
    history_then_backlog(store, instance_id)
    claimed = sorted(r["id"] for r in store.all("claim_tasks", instance_id=instance_id, limit=2000))
    store.commit()
    now = dt.datetime.now(dt.UTC)
    store.all("mark_running", task_ids=claimed[:1000], instance_id=instance_id, time_started=now, shard=0)
    store.commit()
    first, running = claimed[1000:1008], claimed[:8]
    cases = {
        "mark_running": dict(task_ids=first, instance_id=instance_id, time_started=now, shard=0),
        "record_outcomes": dict(instance_id=instance_id, task_ids=running, states=["finished"] * 8,
                                messages=[None] * 8, starts=[None] * 8, ends=[now] * 8),
        "claim_tasks": dict(instance_id=instance_id, limit=8),
    }
    for name, params in cases.items():
        scans, buffers = _explain(store, name, **params)
        for scan in scans:
            assert scan["Node Type"] != "Seq Scan", f"{name} reads the whole table: {scan}"
            if "Index Name" in scan and scan["Index Name"] != "tasks_claimable_idx":
                assert "id" in scan.get("Index Cond", "").replace("(", " ").split(), (
                    f"{name} scans {scan['Index Name']} without naming its ids: {scan}")
        # Eight tasks through a few index descents each, not a walk of 3,000 queued or 1,000 running.
        assert buffers < 1000, f"{name} touched {buffers} buffers for 8 tasks"
    # The status counts and the metrics read the two partial indexes, never the history; retention
    # finds nothing to move through the index of ended tasks, without reading them; "has this VM a task
    # running" reads the index of running tasks' keys.
    for name, params in (("queue_summary", {}), ("active_counts", {}), ("oldest_queued", {}),
                         ("running_tasks", {}), ("archive_ended_tasks", {"keep_s": 7 * DAY, "batch": 100}),
                         ("count_ended_tasks", {"keep_s": 7 * DAY}),
                         ("tasks_changed_since", {"last_id": claimed[-1], "since": now}),
                         ("idle_vms", {}), ("idle_vms_on_host", {"host_id": 1})):
        scans, _ = _explain(store, name, **params)
        assert not [s for s in scans if s["Node Type"] == "Seq Scan"], f"{name} reads the whole table"


# -- migration 0010 on a populated database ----------------------------------------------------------


def test_migration_0010_keeps_every_task_and_rebuilds_the_indexes(empty_dsn: str) -> None:
    conn = psycopg2.connect(empty_dsn)
    try:
        migrate.upgrade(conn, through=9)
        with conn.cursor() as cur:
            cur.execute("INSERT INTO instances (hostname, pid, version, mode, shards) "
                        "VALUES ('old', 1, 'old', 'standalone', 1) RETURNING id")
            instance_id = cur.fetchone()[0]
            cur.execute("""INSERT INTO tasks (task_target_type, task_target_id, action, state, claimed_by,
                                              time_started, time_ended, message)
                           SELECT 'Vm', g %% 50, 'noop', s.state, CASE WHEN s.state = 'queued' THEN NULL
                                  ELSE %s END,
                                  CASE WHEN s.state <> 'queued' THEN now() END,
                                  CASE WHEN s.state IN ('finished', 'failed') THEN now() END,
                                  CASE WHEN s.state = 'failed' THEN 'broke' END
                           FROM generate_series(1, 300) g,
                                LATERAL (SELECT (ARRAY['queued', 'running', 'finished', 'failed'])[1 + g %% 4]
                                         AS state) s""", (instance_id,))
            cur.execute("SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state")
            before = cur.fetchall()
        conn.commit()
        applied = migrate.upgrade(conn)
        assert [m.version for m in applied][:1] == [10]
    finally:
        conn.close()
    after = query(empty_dsn, "SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state")
    assert [(r["state"], r["count"]) for r in after] == before
    indexes = {r["indexname"]: r["indexdef"] for r in query(
        empty_dsn, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'tasks'")}
    assert not {"tasks_state_idx", "tasks_claimed_idx", "tasks_key_idx"} & set(indexes)
    assert "(id) WHERE ((claimed_by IS NOT NULL)" in indexes["tasks_held_idx"]
    assert "WHERE ((state = 'running'::text)" in indexes["tasks_running_key_idx"]
    running = query(empty_dsn, "SELECT count(*) AS n FROM tasks WHERE key_type = 'Vm' AND key_id = 1 "
                               "AND state = 'running'")[0]["n"]
    assert running == len([g for g in range(1, 301) if g % 50 == 1 and g % 4 == 1])


def test_the_archive_has_the_columns_of_tasks_in_their_order(dsn: str) -> None:
    """A later migration that adds a column to tasks must add it to tasks_archive (rows move with SELECT *)."""
    columns = {table: [(r["column_name"], r["data_type"]) for r in query(
        dsn, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s "
             "ORDER BY ordinal_position", (table,))] for table in ("tasks", "tasks_archive")}
    assert columns["tasks_archive"] == columns["tasks"]


# -- retention ------------------------------------------------------------------------------------------


def _population(store: Store) -> dict[str, list[int]]:
    """Tasks of every kind around a 7-day retention."""
    instance_id = _instance(store)
    old = [{"state": s, "ended_days_ago": 9, "claimed_by": instance_id} for s in TERMINAL]
    old.append({"state": "canceled", "ended_days_ago": 30})  # canceled before any claim
    young = [{"state": s, "ended_days_ago": 2, "claimed_by": instance_id} for s in TERMINAL]
    unended = [{"state": "queued", "created_days_ago": 40},
               {"state": "queued", "created_days_ago": 40, "claimed_by": instance_id},
               {"state": "running", "created_days_ago": 40, "claimed_by": instance_id},
               {"state": "paused", "created_days_ago": 40, "claimed_by": instance_id}]
    groups = {"old": _insert(store, old), "young": _insert(store, young), "unended": _insert(store, unended)}
    # A parent whose child still runs stays (and so does the child); a parent whose children all ended
    # long ago goes after them.
    [busy_parent] = _insert(store, [{"state": "finished", "ended_days_ago": 9}])
    groups["busy_family"] = [busy_parent, *_insert(store, [
        {"state": "finished", "ended_days_ago": 9, "parent": busy_parent},
        {"state": "running", "parent": busy_parent, "claimed_by": instance_id}])]
    [done_parent] = _insert(store, [{"state": "failed", "ended_days_ago": 8}])
    groups["done_family"] = [done_parent, *_insert(store, [
        {"state": "finished", "ended_days_ago": 9, "parent": done_parent},
        {"state": "failed", "ended_days_ago": 9, "parent": done_parent}])]
    # The finished child of the busy parent may go on its own: nothing references it.
    groups["leaving"] = [*groups["old"], groups["busy_family"][1], *groups["done_family"]]
    return groups


def test_archiving_moves_exactly_the_tasks_ended_long_enough_ago(store: Store) -> None:
    groups = _population(store)
    rows_before = {r["id"]: r for r in query(store.conn.dsn, "SELECT * FROM tasks")}
    policy = Policy(keep_s=7 * DAY, archive=True, archive_keep_s=None, batch=2)
    counted = dry_run(store, policy)
    assert counted["would_archive"] == len(groups["leaving"]) - 1  # the done parent waits for its children
    assert counted["held_back_by_children"] == 2  # both parents
    assert _ids(store, "tasks_archive") == set()  # a dry run changes nothing

    result = run_pass(store, policy)

    assert result.moved == len(groups["leaving"]) and result.finished and not result.locked_out
    assert _ids(store, "tasks_archive") == set(groups["leaving"])
    assert _ids(store, "tasks") == set(rows_before) - set(groups["leaving"])
    archived = {r["id"]: r for r in query(store.conn.dsn, "SELECT * FROM tasks_archive")}
    assert all(archived[i] == rows_before[i] for i in groups["leaving"]), "an archived row changed"
    assert run_pass(store, policy).moved == 0


def test_pruning_without_archive_deletes_them(store: Store) -> None:
    groups = _population(store)
    result = run_pass(store, Policy(keep_s=7 * DAY, archive=False, archive_keep_s=None, batch=1000))
    assert result.moved == len(groups["leaving"])
    assert _ids(store, "tasks_archive") == set()
    assert not _ids(store, "tasks") & set(groups["leaving"])
    assert set(groups["unended"]) <= _ids(store, "tasks")


def test_the_archive_is_pruned_by_its_own_age(store: Store) -> None:
    groups = _population(store)
    run_pass(store, Policy(keep_s=1 * DAY, archive=True, archive_keep_s=None, batch=1000))
    archived = _ids(store, "tasks_archive")
    assert set(groups["young"]) <= archived
    result = run_pass(store, Policy(keep_s=None, archive=True, archive_keep_s=20 * DAY, batch=3))
    assert result.archive_pruned == 1 and result.moved == 0  # only the one that ended 30 days ago
    assert _ids(store, "tasks_archive") == archived - {groups["old"][-1]}


def test_only_one_retention_at_a_time(dsn: str, store: Store) -> None:
    _population(store)
    holder = psycopg2.connect(dsn)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (retention_db.RETENTION_LOCK_ID,))
        result = run_pass(store, Policy(keep_s=7 * DAY, archive=True, archive_keep_s=None, batch=10))
        assert result.locked_out and result.moved == 0
        assert _ids(store, "tasks_archive") == set()
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (retention_db.RETENTION_LOCK_ID,))
    finally:
        holder.close()
    assert run_pass(store, Policy(keep_s=7 * DAY, archive=True, archive_keep_s=None, batch=10)).moved > 0


def test_a_pass_stops_at_its_deadline_and_the_next_goes_on(store: Store) -> None:
    groups = _population(store)
    policy = Policy(keep_s=7 * DAY, archive=True, archive_keep_s=None, batch=1)
    first = run_pass(store, policy, deadline=0.0)  # already past: not one batch
    assert not first.finished and first.moved == 0
    assert run_pass(store, policy).moved == len(groups["leaving"])


# -- the planner's history --------------------------------------------------------------------------------


def test_the_planner_history_counts_archived_tasks_once(store: Store) -> None:
    groups = _population(store)
    until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    since = until - dt.timedelta(days=60)
    before = history.read_history(store, since, until, 3600.0)
    run_pass(store, Policy(keep_s=7 * DAY, archive=True, archive_keep_s=None, batch=1000))
    after = history.read_history(store, since, until, 3600.0)
    assert after.window["tasks"] == before.window["tasks"] > len(groups["leaving"])
    assert after.actions == before.actions
    assert sum(r["tasks"] for r in after.key_actions) == after.window["tasks"]



def _plan_nodes(plan: dict[str, Any]) -> list[str]:
    return [plan["Node Type"], *(n for child in plan.get("Plans", []) for n in _plan_nodes(child))]


def test_record_outcomes_writes_each_tasks_own_values_without_a_join(store: Store) -> None:
    """Each task gets the values at its own position in the arrays, whatever their order, and the
    statement is one index scan by id: joined to unnest(...) the planner rescanned the unnest for each
    task (n^2 rows through a join filter, 4,032 for 64 tasks: the regression that came with 0010)."""
    instance_id = _instance(store)
    with store.conn.cursor() as cur:
        cur.execute("""INSERT INTO tasks (task_target_type, task_target_id, action, submitted_by)
                       SELECT 'Vm', g, 'noop', 'test' FROM generate_series(1, 64) g""")
    store.commit()
    ids = sorted(r["id"] for r in store.all("claim_tasks", instance_id=instance_id, limit=64))
    started = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    store.all("mark_running", task_ids=ids, instance_id=instance_id, time_started=started, shard=0)
    store.commit()
    order = ids[1::2] + ids[::2][::-1]  # neither sorted nor the order they were started in
    ends = {task: started + dt.timedelta(seconds=task) for task in order}
    params = dict(instance_id=instance_id, task_ids=order,
                  states=["failed" if t % 3 == 0 else "finished" for t in order],
                  messages=[f"task {t}" for t in order],
                  starts=[None if t % 2 else started - dt.timedelta(seconds=t) for t in order],
                  ends=[ends[t] for t in order])
    with store.conn.cursor() as cur:
        cur.execute("EXPLAIN (FORMAT JSON) " + cur.mogrify(named_query("record_outcomes"), params).decode())
        nodes = _plan_nodes(cur.fetchone()[0][0]["Plan"])
    store.rollback()
    assert not {"Nested Loop", "Hash Join", "Merge Join", "Function Scan"} & set(nodes), nodes
    written = store.all("record_outcomes", **params)
    store.commit()
    assert sorted(r["id"] for r in written) == ids
    rows = {r["id"]: r for r in _rows(store, ids)}
    for task in ids:
        row = rows[task]
        assert row["state"] == ("failed" if task % 3 == 0 else "finished")
        assert row["message"] == f"task {task}"
        assert row["time_ended"] == ends[task]
        assert row["time_started"] == (started if task % 2 else started - dt.timedelta(seconds=task))
    assert store.all("record_outcomes", **params) == []  # only once
    store.commit()


def _rows(store: Store, ids: list[int]) -> list[dict[str, Any]]:
    with store.conn.cursor() as cur:
        cur.execute("SELECT id, state, message, time_started, time_ended FROM tasks WHERE id = ANY(%s)", (ids,))
        names = [c.name for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
