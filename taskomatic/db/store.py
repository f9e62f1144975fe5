"""The database connector: runs the named queries of queries.sql.

It knows how to execute and commit, not what a query means for the daemon;
the fetcher, shards and CLI call it with names and parameters.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import psycopg2.extensions

from taskomatic.db.queries import query
from taskomatic.text import first_line

log = logging.getLogger(__name__)

Row = dict[str, Any]

# The statements of every task's path: PostgreSQL parses and plans each of them once per
# connection (PREPARE) instead of at every call. Their plans do not depend on the values
# (ids are the index condition), so the generic plan PostgreSQL settles on is the one it
# would choose anyway. Not the claims: their plans are steered by per-transaction planner
# settings (claim_settings, claim_partition_planner) that a cached plan would not see.
# Measured (backend CPU, 20,000 tasks in batches of 32): the fenced start 0.0325 -> 0.0245 s
# per 1,000 tasks, the standalone one 0.0205 -> 0.0180.
PREPARED_QUERIES = frozenset({
    "mark_running", "record_outcomes", "mark_running_fenced", "record_outcomes_fenced", "hold_partitions",
    "end_and_start", "end_and_start_fenced",
})
_PARAMETER = re.compile(r"%\((\w+)\)s")


class DatabaseUnavailable(Exception):
    """The database could not be reached within the deadline."""


def connect(dsn: str, application_name: str, timeout: float = 10.0) -> psycopg2.extensions.connection:
    """One connection, retried until ``timeout``; never logs the DSN (it may hold a password)."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        try:
            conn = psycopg2.connect(
                dsn,
                application_name=application_name,
                connect_timeout=max(1, int(timeout)),
                # A dead database must not hang a blocked read forever.
                keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
            )
            return conn
        except psycopg2.OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise DatabaseUnavailable(f"cannot connect to the database: {first_line(exc)}") from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class Store:
    """A connection plus the named queries. One per process; not thread-safe.

    ``begin_with_first``: the transaction's BEGIN travels with its first
    statement, in the same round trip, instead of on its own (what psycopg2
    does). For the hot path's short transactions (a shard's start and outcome
    writes, the fetcher's claims) that is one round trip in four. The
    connection is then in autocommit mode and this store sends BEGIN, COMMIT
    and ROLLBACK itself, so everything on it must go through the store.
    Whether a transaction is open is what the server last said (libpq's
    transaction status, no round trip), never a flag of ours: a statement
    that failed before the server ran its BEGIN (a bad parameter, a syntax
    error) leaves none open, and the next statement must begin one.
    """

    def __init__(self, conn: psycopg2.extensions.connection, prepare: bool = True,
                 begin_with_first: bool = False) -> None:
        self.conn = conn
        self.prepare = prepare  # False: PREPARED_QUERIES run as plain SQL too (bench.statements compares)
        self._executes: dict[str, str] = {}  # prepared query name -> its EXECUTE, with a cast per parameter
        self._ahead = ""  # statements sent with the next one (send_with_next)
        self.begin_with_first = begin_with_first
        if begin_with_first:
            conn.autocommit = True

    @classmethod
    def open(cls, dsn: str, application_name: str, timeout: float = 10.0, prepare: bool = True,
             begin_with_first: bool = False) -> Store:
        return cls(connect(dsn, application_name, timeout), prepare, begin_with_first)

    @property
    def in_transaction(self) -> bool:
        """The server says a transaction is open (or failed and not yet ended), or cannot say (the
        connection is broken): what COMMIT or ROLLBACK is due for."""
        return self.conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE

    def _lead(self, begin: bool = True) -> str:
        """What goes ahead of the next statement: BEGIN if it opens a transaction (and ``begin``),
        then what send_with_next queued."""
        ahead, self._ahead = self._ahead, ""
        if begin and self.begin_with_first and not self.in_transaction:
            return "BEGIN;\n" + ahead
        return ahead

    def close(self) -> None:
        if not self.conn.closed:
            self.conn.close()

    def _cursor(self) -> psycopg2.extensions.cursor:
        # psycopg2's plain cursor: its rows are tuples built in C. RealDictCursor builds each row
        # in Python, one __setitem__ per column, and its execute and fetch are Python too: about
        # 20 us more per one-row statement here, and a fifth of a no-op's daemon CPU (bench/RESULTS.md,
        # "The store reads rows as tuples").
        return self.conn.cursor()

    def statement_text(self, name: str) -> str:
        """What this store sends for a named query: its SQL, or for a hot-path one the EXECUTE of its
        prepared statement (prepared on this connection first if need be). For EXPLAIN in tests."""
        with self._cursor() as cur:
            return self._text(name, cur)

    def _text(self, name: str, cur: Any) -> str:
        if self.prepare and name in PREPARED_QUERIES:
            return self._executes.get(name) or self._prepare(name, cur)
        return query(name)

    def _statement(self, name: str, cur: Any, begin: bool = True) -> str:
        """The text to execute for a named query, with what send_with_next queued ahead of it."""
        text = self._text(name, cur)
        return self._lead(begin) + text

    def _prepare(self, name: str, cur: Any) -> str:
        """PREPARE a named query on this connection (it outlives a rollback) and return its EXECUTE."""
        order: list[str] = []

        def positional(match: re.Match[str]) -> str:
            if match.group(1) not in order:
                order.append(match.group(1))
            return f"${order.index(match.group(1)) + 1}"

        from psycopg2 import sql

        body = _PARAMETER.sub(positional, query(name)).replace("%%", "%")  # the package's own SQL
        statement = sql.Identifier(f"tkm_{name}")
        cur.execute(sql.SQL("PREPARE {} AS {}").format(statement, sql.SQL(body)))
        cur.execute("SELECT parameter_types::text[] FROM pg_prepared_statements WHERE name = %(name)s",
                    {"name": f"tkm_{name}"})
        types = cur.fetchone()[0]
        # A cast per argument: psycopg2 sends values as literals (a list of None is ARRAY[NULL], text[]).
        arguments = [sql.SQL("{}::{}").format(sql.Placeholder(param), sql.SQL(kind))
                     for param, kind in zip(order, types, strict=True)]
        execute = sql.SQL("EXECUTE {}").format(statement)
        if arguments:
            execute += sql.SQL("({})").format(sql.SQL(", ").join(arguments))
        self._executes[name] = execute.as_string(cur)
        return self._executes[name]

    def send_with_next(self, name: str, /, **params: Any) -> None:
        """Send this named query together with the next one, in one round trip (its result is not read).

        For settings local to the transaction (set_config(..., true)) that come first in it: one
        round trip less per transaction. Dropped if the transaction ends before another statement.
        """
        with self._cursor() as cur:
            self._ahead += cur.mogrify(query(name), params).decode().replace("%", "%%") + ";\n"

    def all(self, name: str, /, **params: Any) -> list[Row]:
        with self._cursor() as cur:
            cur.execute(self._statement(name, cur), params)
            return _rows(cur)

    def all_last(self, name: str, last: bool, /, **params: Any) -> list[Row]:
        """``all``, for a statement that may be the last of its transaction (``last``). If it is, with
        ``begin_with_first`` and no transaction open yet, it is the whole transaction: it goes without
        BEGIN and the server commits it (with what send_with_next queued: one implicit transaction)
        before it answers. One round trip, and the caller's commit has nothing left to do."""
        alone = last and self.begin_with_first and not self.in_transaction
        with self._cursor() as cur:
            cur.execute(self._statement(name, cur, begin=not alone), params)
            return _rows(cur)

    def one(self, name: str, /, **params: Any) -> Row | None:
        rows = self.all(name, **params)
        return rows[0] if rows else None

    def run(self, name: str, /, **params: Any) -> int:
        """Execute; return the affected row count."""
        with self._cursor() as cur:
            cur.execute(self._statement(name, cur), params)
            return cur.rowcount

    def scalar(self, name: str, /, **params: Any) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(self._statement(name, cur), params)
            row = cur.fetchone()
            return row[0] if row else None

    def commit(self) -> None:
        self._ahead = ""
        if not self.begin_with_first:
            self.conn.commit()
        elif self.in_transaction:
            self._end("COMMIT")

    def rollback(self) -> None:
        self._ahead = ""
        if not self.begin_with_first:
            self.conn.rollback()
        elif self.in_transaction:
            self._end("ROLLBACK")

    def _end(self, command: str) -> None:
        with self.conn.cursor() as cur:
            cur.execute(command)

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """Commit on success, roll back on any exception."""
        try:
            yield self
        except BaseException:
            self._ahead = ""
            if not self.conn.closed:
                self.rollback()
            raise
        else:
            self.commit()

    def update_row(self, table: str, row_id: int, values: dict[str, Any]) -> None:
        """UPDATE one row of a resource table; column names come from code, never input."""
        if not values:
            return
        if table not in ("vms", "hosts", "storage_pools", "storage_volumes"):
            raise ValueError(f"not a resource table: {table}")
        from psycopg2 import sql

        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(col), sql.Placeholder(col)) for col in values
        )
        statement = sql.SQL("UPDATE {} SET {}, updated_at = clock_timestamp() WHERE id = %(_id)s").format(
            sql.Identifier(table), assignments
        )
        statement = sql.SQL(self._lead()) + statement
        with self.conn.cursor() as cur:
            cur.execute(statement, {**values, "_id": row_id})


def _rows(cur: psycopg2.extensions.cursor) -> list[Row]:
    """The executed statement's rows as dicts keyed by column name ([] for a statement without rows)."""
    if cur.description is None:
        return []
    names = [column.name for column in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def listen(conn: psycopg2.extensions.connection, channel: str) -> None:
    """LISTEN on a notification channel (an autocommit connection: notifications arrive between statements)."""
    from psycopg2 import sql

    with conn.cursor() as cur:
        cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
