"""Schema migrations and the public tasks table, on a real PostgreSQL.

Covers ``taskomatic.db.migrate`` (fresh upgrade, idempotence, concurrent
upgrades, dry run, the out-of-date check) and what the schema promises to
other programs: the public columns of ``tasks`` and their types, defaults for
a plain INSERT, the ordering-key trigger, the failed-needs-message constraint
and the NOTIFY sent on insert.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

from taskomatic.db import migrate
from tests.helpers import REPO, query, wait_for

ALL_TABLES = {"tasks", "hosts", "vms", "storage_pools", "storage_volumes", "vm_disks", "instances",
              "schema_migrations"}

# DESIGN.md, "The tasks table is a public interface": column -> PostgreSQL type.
PUBLIC_TASK_COLUMNS = {
    "id": "bigint",
    "task_target_type": "text",
    "task_target_id": "bigint",
    "action": "text",
    "args": "jsonb",
    "state": "text",
    "message": "text",
    "submitted_by": "text",
    "created_at": "timestamp with time zone",
    "time_started": "timestamp with time zone",
    "time_ended": "timestamp with time zone",
}


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg2.extensions.connection]:
    connection = psycopg2.connect(dsn)
    yield connection
    connection.close()


@pytest.fixture
def empty_conn(empty_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    connection = psycopg2.connect(empty_dsn)
    yield connection
    connection.close()


def _tables(dsn: str) -> set[str]:
    rows = query(dsn, "SELECT table_name FROM information_schema.tables "
                      "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")
    return {r["table_name"] for r in rows}


def _recorded(dsn: str) -> list[tuple[int, str]]:
    rows = query(dsn, "SELECT version, name FROM schema_migrations ORDER BY version")
    return [(r["version"], r["name"]) for r in rows]


def _shipped() -> list[tuple[int, str]]:
    return [(m.version, m.name) for m in migrate.available_migrations()]


# -- the runner -------------------------------------------------------------------------

def test_shipped_migrations_are_numbered_from_one_without_gaps() -> None:
    versions = [v for v, _ in _shipped()]
    assert versions, "no migrations shipped with the package"
    assert versions == list(range(1, len(versions) + 1))
    assert _shipped()[0] == (1, "initial")


def test_upgrade_from_empty_creates_every_table_and_records_every_migration(
        empty_dsn: str, empty_conn: psycopg2.extensions.connection) -> None:
    assert _tables(empty_dsn) == set()

    applied = migrate.upgrade(empty_conn)

    assert [(m.version, m.name) for m in applied] == _shipped()
    assert _tables(empty_dsn) >= ALL_TABLES
    assert _recorded(empty_dsn) == _shipped()
    # Committed: another connection sees it, and the check passes.
    migrate.check_current(empty_conn)
    assert migrate.pending_migrations(empty_conn) == []


def test_upgrade_twice_applies_nothing_the_second_time(
        empty_dsn: str, empty_conn: psycopg2.extensions.connection) -> None:
    migrate.upgrade(empty_conn)
    before = query(empty_dsn, "SELECT version, applied_at FROM schema_migrations ORDER BY version")

    assert migrate.upgrade(empty_conn) == []

    after = query(empty_dsn, "SELECT version, applied_at FROM schema_migrations ORDER BY version")
    assert after == before
    # The connection is left usable and outside a transaction.
    assert empty_conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def test_dry_run_lists_pending_without_applying(
        empty_dsn: str, empty_conn: psycopg2.extensions.connection) -> None:
    pending = migrate.upgrade(empty_conn, dry_run=True)

    assert [(m.version, m.name) for m in pending] == _shipped()
    # Nothing was created, not even the bookkeeping table.
    assert _tables(empty_dsn) == set()
    with pytest.raises(migrate.SchemaOutOfDate):
        migrate.check_current(empty_conn)

    migrate.upgrade(empty_conn)
    assert migrate.upgrade(empty_conn, dry_run=True) == []


def test_check_current_raises_on_an_empty_database(empty_conn: psycopg2.extensions.connection) -> None:
    with pytest.raises(migrate.SchemaOutOfDate) as raised:
        migrate.check_current(empty_conn)
    message = str(raised.value)
    assert "0001_initial" in message
    assert "taskomatic db upgrade" in message


def test_check_current_passes_on_a_migrated_database(conn: psycopg2.extensions.connection) -> None:
    migrate.check_current(conn)


def test_check_current_raises_when_a_migration_is_missing(
        dsn: str, conn: psycopg2.extensions.connection) -> None:
    last_version, last_name = _shipped()[-1]
    query(dsn, "DELETE FROM schema_migrations WHERE version = %s", (last_version,))
    with pytest.raises(migrate.SchemaOutOfDate, match=f"{last_version:04d}_{last_name}"):
        migrate.check_current(conn)


def _lock_waiters(dsn: str) -> int:
    """Sessions waiting for the migration advisory lock."""
    rows = query(dsn, "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                      "AND objid = %s AND database = (SELECT oid FROM pg_database WHERE datname = "
                      "current_database())", (migrate.MIGRATION_LOCK_ID,))
    return int(rows[0]["n"])


def test_two_processes_upgrading_the_same_empty_database_concurrently(empty_dsn: str) -> None:
    """Both succeed; the schema is applied exactly once.

    The test holds the migration lock while both processes start, waits until
    both are queued behind it, then lets go: they really do race.
    """
    blocker = psycopg2.connect(empty_dsn)
    processes: list[subprocess.Popen[str]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKOMATIC_")}
    env["PYTHONPATH"] = str(REPO)
    try:
        with blocker.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (migrate.MIGRATION_LOCK_ID,))
        for _ in range(2):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "taskomatic", "db", "upgrade", "--dsn", empty_dsn],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO)))

        def both_waiting() -> bool:
            for p in processes:
                if p.poll() is not None:  # it did not wait for the lock
                    out, err = p.communicate()
                    raise AssertionError(f"upgrade ran while another held the migration lock "
                                         f"(exit {p.returncode}): {out}\n{err}")
            return _lock_waiters(empty_dsn) == 2

        wait_for(both_waiting, timeout=30, what="both upgrade processes to wait for the migration lock")
        blocker.rollback()  # releases the transaction-level lock
        outputs = [p.communicate(timeout=60) for p in processes]
        results = [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs, strict=True)]
    finally:
        blocker.close()
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()

    for code, out, err in results:
        assert code == 0, f"upgrade failed ({code}): {out}\n{err}"
    stdouts = [out for _, out, _ in results]
    applied_lines = [line for out in stdouts for line in out.splitlines() if line.startswith("applied:")]
    assert applied_lines == [f"applied: {v:04d}_{n}" for v, n in _shipped()]
    assert sum("schema is up to date" in out for out in stdouts) == 1
    assert _recorded(empty_dsn) == _shipped()
    assert _tables(empty_dsn) >= ALL_TABLES


def test_two_threads_upgrading_through_the_library(empty_dsn: str) -> None:
    """The same race through ``migrate.upgrade``: the loser waits, then finds nothing to do."""
    blocker = psycopg2.connect(empty_dsn)
    conns = [psycopg2.connect(empty_dsn) for _ in range(2)]
    results: list[list[migrate.Migration] | BaseException] = [[], []]

    def run(i: int) -> None:
        try:
            results[i] = migrate.upgrade(conns[i])
        except BaseException as exc:  # reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    try:
        with blocker.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (migrate.MIGRATION_LOCK_ID,))
        for t in threads:
            t.start()

        def both_waiting() -> bool:
            assert all(t.is_alive() for t in threads), "an upgrade ran while another held the migration lock"
            return _lock_waiters(empty_dsn) == 2

        wait_for(both_waiting, timeout=30, what="both upgrades to wait for the lock")
    finally:
        blocker.close()  # releases the lock, also when the test failed
        for t in threads:
            t.join(30)
        for c in conns:
            c.close()
    assert not any(t.is_alive() for t in threads), "an upgrade did not finish"

    applied: list[list[int]] = []
    for r in results:
        assert not isinstance(r, BaseException), f"upgrade raised {r!r}"
        applied.append([m.version for m in r])
    assert sorted(applied) == [[], [v for v, _ in _shipped()]]
    assert _recorded(empty_dsn) == _shipped()


# -- the public tasks table --------------------------------------------------------------

def test_tasks_table_has_the_public_columns_with_the_right_types(dsn: str) -> None:
    rows = query(dsn, "SELECT column_name, data_type, is_nullable, column_default, datetime_precision "
                      "FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'tasks'")
    columns = {r["column_name"]: r for r in rows}

    for name, data_type in PUBLIC_TASK_COLUMNS.items():
        assert name in columns, f"public column tasks.{name} is missing"
        assert columns[name]["data_type"] == data_type, f"tasks.{name} is {columns[name]['data_type']}"
    for name in ("created_at", "time_started", "time_ended"):
        assert columns[name]["datetime_precision"] == 6, f"tasks.{name} must keep microseconds"

    # bigserial: a sequence default.
    assert "nextval(" in (columns["id"]["column_default"] or "")
    # The primary key is id.
    pk = query(dsn, "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                    "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'tasks'::regclass AND i.indisprimary")
    assert [r["attname"] for r in pk] == ["id"]

    # Whatever internal columns exist, a plain INSERT of the public ones must work:
    # every internal column is nullable or has a default.
    internal = set(columns) - set(PUBLIC_TASK_COLUMNS)
    for name in internal:
        col = columns[name]
        assert col["is_nullable"] == "YES" or col["column_default"] is not None, (
            f"internal column tasks.{name} would break a plain INSERT by other programs")
    # The public columns a submitter may leave out are optional too.
    for name in ("id", "args", "state", "message", "submitted_by", "created_at", "time_started", "time_ended"):
        col = columns[name]
        assert col["is_nullable"] == "YES" or col["column_default"] is not None, name


def test_plain_insert_gets_the_documented_defaults(dsn: str) -> None:
    now = query(dsn, "SELECT clock_timestamp() AS t")[0]["t"]
    rows = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                      "VALUES ('Vm', 1, 'start_vm') RETURNING *")
    task = rows[0]
    assert task["state"] == "queued"
    assert task["args"] == {}
    assert task["created_at"] is not None and task["created_at"] >= now
    assert task["time_started"] is None and task["time_ended"] is None
    assert task["message"] is None
    assert task["id"] >= 1
    # Vm key = the VM id.
    assert (task["key_type"], task["key_id"]) == ("Vm", 1)
    # Submission order.
    second = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                        "VALUES ('Vm', 1, 'shutdown_vm') RETURNING id, created_at")[0]
    assert second["id"] > task["id"]
    assert second["created_at"] > task["created_at"]


def test_unknown_state_is_rejected(dsn: str) -> None:
    with pytest.raises(psycopg2.errors.CheckViolation):
        query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, state) "
                   "VALUES ('Vm', 1, 'start_vm', 'done')")


@pytest.mark.parametrize(("target_type", "key_type"), [
    ("Vm", "Vm"), ("StoragePool", "StoragePool"), ("Host", "Host"),
])
def test_ordering_key_is_the_target_itself(dsn: str, target_type: str, key_type: str) -> None:
    task = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                      "VALUES (%s, 42, 'x') RETURNING key_type, key_id", (target_type,))[0]
    assert (task["key_type"], task["key_id"]) == (key_type, 42)


def test_storage_volume_task_is_keyed_by_its_pool(dsn: str) -> None:
    pool_id = query(dsn, "INSERT INTO storage_pools (name) VALUES ('pool-a') RETURNING id")[0]["id"]
    other_pool = query(dsn, "INSERT INTO storage_pools (name) VALUES ('pool-b') RETURNING id")[0]["id"]
    vol_id = query(dsn, "INSERT INTO storage_volumes (storage_pool_id, name) VALUES (%s, 'v1') RETURNING id",
                   (pool_id,))[0]["id"]
    query(dsn, "INSERT INTO storage_volumes (storage_pool_id, name) VALUES (%s, 'v2')", (other_pool,))

    task = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                      "VALUES ('StorageVolume', %s, 'delete_volume') RETURNING key_type, key_id", (vol_id,))[0]
    assert (task["key_type"], task["key_id"]) == ("StoragePool", pool_id)

    # Volume work serialises with the pool's own work: same key.
    pool_task = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                           "VALUES ('StoragePool', %s, 'refresh_pool') RETURNING key_type, key_id",
                      (pool_id,))[0]
    assert (pool_task["key_type"], pool_task["key_id"]) == (task["key_type"], task["key_id"])


def test_bulk_insert_keys_every_row(dsn: str) -> None:
    pool_id = query(dsn, "INSERT INTO storage_pools (name) VALUES ('p') RETURNING id")[0]["id"]
    vol_id = query(dsn, "INSERT INTO storage_volumes (storage_pool_id, name) VALUES (%s, 'v') RETURNING id",
                   (pool_id,))[0]["id"]
    rows = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES "
                      "('Vm', 7, 'start_vm'), ('StorageVolume', %s, 'delete_volume'), ('Host', 3, 'clear_vms') "
                      "RETURNING key_type, key_id", (vol_id,))
    assert [(r["key_type"], r["key_id"]) for r in rows] == [("Vm", 7), ("StoragePool", pool_id), ("Host", 3)]


def test_failed_task_without_message_is_rejected(dsn: str) -> None:
    with pytest.raises(psycopg2.errors.CheckViolation) as raised:
        query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, state) "
                   "VALUES ('Vm', 1, 'start_vm', 'failed')")
    assert raised.value.diag.constraint_name == "tasks_failed_needs_message"

    task_id = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                         "VALUES ('Vm', 1, 'start_vm') RETURNING id")[0]["id"]
    with pytest.raises(psycopg2.errors.CheckViolation) as raised:
        query(dsn, "UPDATE tasks SET state = 'failed' WHERE id = %s", (task_id,))
    assert raised.value.diag.constraint_name == "tasks_failed_needs_message"

    # With a message it is fine.
    query(dsn, "UPDATE tasks SET state = 'failed', message = 'no such domain' WHERE id = %s", (task_id,))
    assert query(dsn, "SELECT state FROM tasks WHERE id = %s", (task_id,))[0]["state"] == "failed"


def test_insert_sends_a_notification(dsn: str) -> None:
    listener = psycopg2.connect(dsn)
    listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    try:
        with listener.cursor() as cur:
            cur.execute("LISTEN taskomatic_new_tasks")

        query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', 1, 'start_vm')")

        def notified() -> list[psycopg2.extensions.Notify]:
            select.select([listener], [], [], 0.05)
            listener.poll()
            return list(listener.notifies)

        notes = wait_for(notified, timeout=10, interval=0.0, what="a NOTIFY on taskomatic_new_tasks")
        assert {n.channel for n in notes} == {"taskomatic_new_tasks"}
    finally:
        listener.close()


def test_no_notification_before_commit(dsn: str) -> None:
    """NOTIFY is transactional: a rolled-back insert wakes nobody, a committed one does."""
    listener = psycopg2.connect(dsn)
    listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    writer = psycopg2.connect(dsn)
    try:
        with listener.cursor() as cur:
            cur.execute("LISTEN taskomatic_new_tasks")
        with writer.cursor() as cur:
            cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', 1, 'a')")
        writer.rollback()
        with writer.cursor() as cur:
            cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', 2, 'b')")
        writer.commit()

        def notified() -> bool:
            select.select([listener], [], [], 0.05)
            listener.poll()
            return bool(listener.notifies)

        wait_for(notified, timeout=10, interval=0.0, what="a NOTIFY on taskomatic_new_tasks")
        # Notifications arrive in commit order; a rolled-back insert would have
        # come first, as a separate notification.
        assert len(listener.notifies) == 1
    finally:
        listener.close()
        writer.close()


def test_migration_files_are_plain_sql() -> None:
    """Every shipped migration can be read and is non-empty SQL (guards packaging)."""
    for m in migrate.available_migrations():
        assert m.sql.strip(), f"{m.version:04d}_{m.name} is empty"


def test_dry_run_on_an_autocommit_connection_changes_nothing(
        empty_dsn: str, empty_conn: psycopg2.extensions.connection) -> None:
    empty_conn.autocommit = True
    assert [m.version for m in migrate.upgrade(empty_conn, dry_run=True)] == [v for v, _ in _shipped()]
    assert _tables(empty_dsn) == set()
