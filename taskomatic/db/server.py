"""The database server itself, before taskomatic's schema exists: is there a database, create it.

These run on a connection to the server's maintenance database (not a Store:
there is no taskomatic schema to speak of yet). Queries: ``sql/server.sql``.
"""

from __future__ import annotations

import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from taskomatic.db.queries import query


def ensure_database(conn: psycopg2.extensions.connection, name: str) -> None:
    """Create database ``name`` unless it exists.

    ``conn`` is in autocommit: CREATE DATABASE cannot run inside a transaction.
    """
    with conn.cursor() as cur:
        cur.execute(query("database_exists"), {"name": name})
        if cur.fetchone() is not None:
            return
        try:
            # An identifier cannot be a parameter: composed, and quoted, by psycopg2.
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg2.errors.DuplicateDatabase:
            pass  # another process sharing this server won the race
