"""Store(begin_with_first=True), the shards' and the fetcher's store, on a real PostgreSQL.

The connection is in autocommit mode, so psycopg2 sends no BEGIN of its own;
the store puts it ahead of the transaction's first statement (one round trip
less per transaction) and sends COMMIT and ROLLBACK itself. Transactions must
mean exactly what they meant before: what one commits is seen together, what
one rolls back (or fails) is gone, and settings local to a transaction stay
in it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import psycopg2
import psycopg2.extensions
import pytest

from taskomatic.db import claims, instances, task_writes
from taskomatic.db.store import Store

IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
IN_TRANSACTION = psycopg2.extensions.TRANSACTION_STATUS_INTRANS


@pytest.fixture
def store(dsn: str) -> Iterator[Store]:
    opened = Store.open(dsn, "taskomatic tests", timeout=10, begin_with_first=True)
    yield opened
    opened.close()


@pytest.fixture
def other(dsn: str) -> Iterator[psycopg2.extensions.connection]:
    """Another session, to see what is committed."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    yield conn
    conn.close()


def _register(store: Store, pid: int) -> int:
    return int(store.scalar("register_instance", hostname="h", pid=pid, version="test", mode="standalone",
                            shards=1, lease=None))


def _count(conn: psycopg2.extensions.connection) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM instances")
        return int(cur.fetchone()[0])


def _txid(store: Store) -> int:
    with store.conn.cursor() as cur:
        cur.execute("SELECT txid_current()")
        return int(cur.fetchone()[0])


def test_the_first_statement_opens_the_transaction_itself(store: Store) -> None:
    assert store.conn.autocommit  # psycopg2 sends no BEGIN: any transaction is the store's own
    assert store.conn.get_transaction_status() == IDLE
    _register(store, 1)
    assert store.in_transaction and store.conn.get_transaction_status() == IN_TRANSACTION
    first = _txid(store)
    _register(store, 2)
    assert _txid(store) == first  # both statements in one transaction
    store.commit()
    assert not store.in_transaction and store.conn.get_transaction_status() == IDLE


def test_commit_shows_every_statement_together(store: Store, other: psycopg2.extensions.connection) -> None:
    _register(store, 1)
    _register(store, 2)
    assert _count(other) == 0  # not committed yet
    store.commit()
    assert _count(other) == 2


def test_rollback_discards_the_whole_transaction(store: Store, other: psycopg2.extensions.connection) -> None:
    _register(store, 1)
    store.rollback()
    assert _count(other) == 0
    _register(store, 2)  # a new transaction
    store.commit()
    assert _count(other) == 1


def test_a_failed_statement_rolls_back_with_its_transaction(store: Store,
                                                            other: psycopg2.extensions.connection) -> None:
    with pytest.raises(psycopg2.DatabaseError), store.transaction():
        _register(store, 1)
        with store.conn.cursor() as cur:
            cur.execute("SELECT 1 / 0")
    assert not store.in_transaction
    with store.transaction():
        _register(store, 2)
    assert _count(other) == 1  # the first registration went with the failed transaction


def test_a_failing_first_statement_leaves_no_transaction_behind(store: Store) -> None:
    """BEGIN and a statement that fails were sent together: the block is open (aborted) until the
    rollback the caller makes, and then the store is as new."""
    with pytest.raises(psycopg2.DatabaseError):
        store.scalar("register_instance", hostname="h", pid=1, version="test", mode="not a mode",
                     shards=1, lease=None)
    assert store.in_transaction
    store.rollback()
    assert store.conn.get_transaction_status() == IDLE
    _register(store, 3)
    store.commit()


def test_a_setting_sent_with_next_stays_in_its_transaction(store: Store) -> None:
    instances.limit_idle_transaction(store, 4321)
    assert store.scalar("partition_count") is not None
    with store.conn.cursor() as cur:
        cur.execute("SHOW idle_in_transaction_session_timeout")
        assert cur.fetchone()[0] == "4321ms"
    store.commit()
    with store.conn.cursor() as cur:
        cur.execute("SHOW idle_in_transaction_session_timeout")
        assert cur.fetchone()[0] == "0"


def test_update_row_opens_the_transaction_too(store: Store, other: psycopg2.extensions.connection) -> None:
    with other.cursor() as cur:
        cur.execute("INSERT INTO hosts (hostname, libvirt_uri) VALUES ('h1', 'test:///default') RETURNING id")
        host = int(cur.fetchone()[0])
    instances.limit_idle_transaction(store, 4321)
    store.update_row("hosts", host, {"hostname": "renamed"})
    assert store.in_transaction
    with store.conn.cursor() as cur:
        cur.execute("SHOW idle_in_transaction_session_timeout")
        assert cur.fetchone()[0] == "4321ms"  # the setting went after the BEGIN, with the update
    store.rollback()
    with other.cursor() as cur:
        cur.execute("SELECT hostname FROM hosts WHERE id = %s", (host,))
        assert cur.fetchone()[0] == "h1"


def test_commit_and_rollback_without_a_transaction_send_nothing(store: Store) -> None:
    store.commit()
    store.rollback()
    assert not store.in_transaction and store.conn.get_transaction_status() == IDLE
    assert store.conn.notices == []  # PostgreSQL warns of a COMMIT or ROLLBACK outside a transaction


def test_a_statement_that_never_reached_the_server_leaves_no_transaction(
        store: Store, other: psycopg2.extensions.connection) -> None:
    """Its BEGIN went nowhere either: the next statement must begin the transaction, or everything after
    it would run in autocommit, one statement at a time, its locks gone at once."""
    with pytest.raises(KeyError):
        store.scalar("register_instance", hostname="h")  # the other parameters are missing
    assert not store.in_transaction
    _register(store, 1)
    first = _txid(store)
    _register(store, 2)
    assert _txid(store) == first and _count(other) == 0  # one transaction, not committed
    store.commit()
    assert _count(other) == 2 and store.conn.notices == []


def test_a_prepared_statement_can_open_the_transaction(store: Store, other: psycopg2.extensions.connection) -> None:
    """The hot path's first statement is often an EXECUTE, prepared on first use (outside the
    transaction): it still opens it, and a rollback undoes it."""
    me = _register(store, 1)
    store.commit()
    with other.cursor() as cur:
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action, args, claimed_by) "
                    "VALUES ('Vm', 1, 'start_vm', '{}', %s) RETURNING id", (me,))
        task_id = int(cur.fetchone()[0])
    started = store.all("mark_running", task_ids=[task_id], instance_id=me, shard=0,
                        time_started=dt.datetime.now(dt.UTC))
    assert [r["id"] for r in started] == [task_id] and store.in_transaction
    store.rollback()
    with other.cursor() as cur:
        cur.execute("SELECT state FROM tasks WHERE id = %s", (task_id,))
        assert cur.fetchone()[0] == "queued"


# -- all_last: a statement that ends its transaction ------------------------------------------------


def _instance_with_queued(store: Store, pid: int, count: int) -> tuple[int, list[int]]:
    """A registered instance holding ``count`` queued tasks: (its id, their ids)."""
    me = _register(store, pid)
    store.commit()
    return me, _queued_tasks(store, me, count)


def _queued_tasks(store: Store, me: int, count: int) -> list[int]:
    with store.conn.cursor() as cur:
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action, claimed_by) "
                    "SELECT 'Vm', g, 'noop', %s FROM generate_series(1, %s) g RETURNING id", (me, count))
        return sorted(r[0] for r in cur.fetchall())


def _states(conn: psycopg2.extensions.connection, ids: list[int]) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT state FROM tasks WHERE id = ANY(%s) ORDER BY id", (ids,))
        return [r[0] for r in cur.fetchall()]


def test_a_statement_alone_in_its_transaction_is_committed_by_the_server_in_one_round_trip(
        store: Store, other: psycopg2.extensions.connection) -> None:
    me, ids = _instance_with_queued(store, 7001, 3)
    now = dt.datetime.now(dt.UTC)
    with store.transaction():
        started = task_writes.mark_running(store, me, ids[:2], now, 0, last=True)
        # No BEGIN went ahead of it: the server already committed, another session sees it.
        assert store.conn.get_transaction_status() == IDLE
        assert _states(other, ids) == ["running", "running", "queued"]
    assert sorted(started) == ids[:2]
    ends = task_writes.Ends(ids[:2], ["finished", "failed"], [None, "broke"], [None, None], [now, now])
    with store.transaction():
        written, started = task_writes.end_and_start(store, me, ends, ids[2:], now, 0, last=True)
        assert store.conn.get_transaction_status() == IDLE
    assert written == set(ids[:2]) and set(started) == {ids[2]}
    assert _states(other, ids) == ["finished", "failed", "running"]


def test_a_last_statement_after_others_commits_with_them_or_not_at_all(
        store: Store, other: psycopg2.extensions.connection) -> None:
    me, ids = _instance_with_queued(store, 7002, 2)
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(RuntimeError), store.transaction():
        task_writes.mark_running(store, me, ids[:1], now, 0)  # opens the transaction
        task_writes.mark_running(store, me, ids[1:], now, 0, last=True)  # inside it: no commit of its own
        assert store.conn.get_transaction_status() == IN_TRANSACTION
        raise RuntimeError("roll back")
    assert _states(other, ids) == ["queued", "queued"]


def test_a_failing_statement_alone_leaves_nothing_behind(store: Store,
                                                         other: psycopg2.extensions.connection) -> None:
    me, ids = _instance_with_queued(store, 7003, 2)
    now = dt.datetime.now(dt.UTC)
    with store.transaction():
        task_writes.mark_running(store, me, ids[:1], now, 0)
    store.send_with_next("limit_idle_transaction", ms=4321)  # rides in the same implicit transaction
    ends = task_writes.Ends([ids[0]], ["failed"], [None], [None], [now])  # failed needs a message
    with pytest.raises(psycopg2.DatabaseError), store.transaction():
        task_writes.end_and_start(store, me, ends, ids[1:], now, 0, last=True)
    assert store.conn.get_transaction_status() == IDLE
    assert _states(other, ids) == ["running", "queued"]  # the start went with the refused end


def test_a_claim_alone_commits_in_its_round_trip_and_its_settings_end_with_it(
        store: Store, other: psycopg2.extensions.connection) -> None:
    me = _register(store, 7004)
    store.commit()
    with store.conn.cursor() as cur:
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action) "
                    "SELECT 'Vm', g, 'noop' FROM generate_series(1, 3) g")
    with store.transaction():
        rows = claims.claim_tasks(store, me, 2, last=True)  # its settings ride ahead of it
        assert store.conn.get_transaction_status() == IDLE
    with other.cursor() as cur:
        cur.execute("SELECT count(*) FROM tasks WHERE claimed_by = %s", (me,))
        assert cur.fetchone()[0] == len(rows) == 2
    with store.conn.cursor() as cur:  # local to the claim's implicit transaction: gone with it
        cur.execute("SELECT current_setting('synchronous_commit'), current_setting('enable_sort')")
        assert cur.fetchone() == ("on", "on")


# -- rows: plain dicts from psycopg2's C cursor ---------------------------------------------------


def test_rows_are_dicts_keyed_by_column_with_typed_values(store: Store) -> None:
    """Every query's rows, prepared (mark_running) or not (task_states), are plain dicts keyed by
    column name in column order, with PostgreSQL's types converted; a statement without rows gives []."""
    me, ids = _instance_with_queued(store, 11, 3)
    started = store.all("mark_running", task_ids=ids, instance_id=me, shard=2,
                        time_started=dt.datetime.now(dt.UTC))
    assert sorted(r["id"] for r in started) == ids
    assert all(type(r) is dict and list(r) == ["id", "created_at"] for r in started)
    assert all(isinstance(r["created_at"], dt.datetime) and r["created_at"].tzinfo for r in started)
    states = store.all("task_states", ids=ids)
    assert sorted((r["id"], r["state"], r["claimed_by"], r["run_by_shard"]) for r in states) == [
        (task_id, "running", me, 2) for task_id in ids]
    assert store.all("task_states", ids=[-1]) == [] and store.one("task_states", ids=[-1]) is None
    assert store.all("instance_heartbeat", instance_id=me) == []  # an UPDATE without RETURNING
    store.rollback()


def test_the_store_reads_rows_through_the_plain_cursor(store: Store) -> None:
    """psycopg2's RealDictCursor builds each row in Python and costs about 20 us more per one-row
    statement on the bench machine, a fifth of a no-op's daemon CPU (bench/RESULTS.md, "The store
    reads rows as tuples"): the store's cursors are the C one."""
    with store._cursor() as cur:
        assert type(cur) is psycopg2.extensions.cursor
