"""The database connector: runs the named queries of queries.sql.

It knows how to execute and commit, not what a query means for the daemon;
the fetcher, shards and CLI call it with names and parameters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from taskomatic.db.queries import query
from taskomatic.text import first_line

log = logging.getLogger(__name__)

Row = dict[str, Any]


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
    """A connection plus the named queries. One per process; not thread-safe."""

    def __init__(self, conn: psycopg2.extensions.connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, dsn: str, application_name: str, timeout: float = 10.0) -> Store:
        return cls(connect(dsn, application_name, timeout))

    def close(self) -> None:
        if not self.conn.closed:
            self.conn.close()

    def _cursor(self) -> psycopg2.extras.RealDictCursor:
        return self.conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor)

    def all(self, name: str, /, **params: Any) -> list[Row]:
        with self._cursor() as cur:
            cur.execute(query(name), params)
            return [dict(r) for r in cur.fetchall()] if cur.description else []

    def one(self, name: str, /, **params: Any) -> Row | None:
        rows = self.all(name, **params)
        return rows[0] if rows else None

    def run(self, name: str, /, **params: Any) -> int:
        """Execute; return the affected row count."""
        with self._cursor() as cur:
            cur.execute(query(name), params)
            return cur.rowcount

    def scalar(self, name: str, /, **params: Any) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(query(name), params)
            row = cur.fetchone()
            return row[0] if row else None

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """Commit on success, roll back on any exception."""
        try:
            yield self
        except BaseException:
            if not self.conn.closed:
                self.conn.rollback()
            raise
        else:
            self.conn.commit()

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
        with self.conn.cursor() as cur:
            cur.execute(statement, {**values, "_id": row_id})


def listen(conn: psycopg2.extensions.connection, channel: str) -> None:
    """LISTEN on a notification channel (an autocommit connection: notifications arrive between statements)."""
    from psycopg2 import sql

    with conn.cursor() as cur:
        cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
