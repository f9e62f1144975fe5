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

from taskomatic.db import instances
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
