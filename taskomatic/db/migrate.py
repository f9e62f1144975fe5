"""Ordered, recorded schema migrations.

Each file ``migrations/NNNN_name.sql`` is applied once, in number order, and
recorded in ``schema_migrations``. The whole upgrade runs in one transaction
under a transaction-level advisory lock, so two processes upgrading at once
serialise: the second waits, then finds nothing left to do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

from psycopg2.extensions import connection as Connection

log = logging.getLogger(__name__)

# Arbitrary constant shared by every taskomatic process: "the schema lock".
MIGRATION_LOCK_ID = 0x7A5C0001
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """All migrations shipped with the package, in version order."""
    found = []
    for entry in resources.files("taskomatic.db").joinpath("migrations").iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


def applied_versions(conn: Connection) -> set[int]:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        row = cur.fetchone()
        if not row or not row[0]:
            return set()
        cur.execute("SELECT version FROM schema_migrations")
        return {r[0] for r in cur.fetchall()}


def pending_migrations(conn: Connection) -> list[Migration]:
    done = applied_versions(conn)
    conn.rollback()
    return [m for m in available_migrations() if m.version not in done]


def upgrade(conn: Connection, dry_run: bool = False, through: int | None = None) -> list[Migration]:
    """Apply every pending migration (up to version ``through``); return those applied (or, dry run, pending).

    Runs as one transaction whatever the connection's autocommit setting: the
    advisory lock and the migrations must share it.
    """
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        return _upgrade(conn, dry_run, through)
    finally:
        conn.autocommit = autocommit


def _upgrade(conn: Connection, dry_run: bool, through: int | None) -> list[Migration]:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
        cur.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"""
        )
        cur.execute("SELECT version FROM schema_migrations")
        done = {r[0] for r in cur.fetchall()}
        todo = [m for m in available_migrations()
                 if m.version not in done and (through is None or m.version <= through)]
        if dry_run:
            conn.rollback()
            return todo
        for migration in todo:
            log.info("applying migration %04d_%s", migration.version, migration.name)
            cur.execute(migration.sql)
            cur.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
    conn.commit()
    return todo


def upgrade_at_start(conn: Connection) -> list[Migration]:
    """auto_migrate: apply what is pending at daemon start, under the migration lock.

    For single-instance installs: with several instances, upgrade once with
    ``taskomatic db upgrade`` while they are stopped.
    """
    import psycopg2

    try:
        applied = upgrade(conn)
    except psycopg2.Error as exc:  # e.g. a role that may not change the schema: exit 8, one line
        conn.rollback()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SchemaOutOfDate(f"auto_migrate could not upgrade the schema ({reason}): run 'taskomatic db "
                              "upgrade' as a database role that owns the schema, then start again") from None
    if applied:
        log.info("auto_migrate: applied %s", ", ".join(f"{m.version:04d}_{m.name}" for m in applied))
    return applied


def check_current(conn: Connection) -> None:
    """Raise SchemaOutOfDate unless the schema is exactly the shipped migrations.

    The message is one line that says what to run (a systemd unit lists the
    exit code in RestartPreventExitStatus: no restart loop).
    """
    done = applied_versions(conn)
    conn.rollback()
    shipped = available_migrations()
    missing = [m for m in shipped if m.version not in done]
    unknown = sorted(done - {m.version for m in shipped})
    if unknown:
        raise SchemaOutOfDate(
            f"the database schema is newer than this taskomatic (migrations {', '.join(map(str, unknown))} "
            "are unknown to it): install the taskomatic version that upgraded the database")
    if missing:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
        raise SchemaOutOfDate(
            f"the database schema is out of date (missing {names}): stop every taskomatic instance, run "
            "'taskomatic db upgrade' (as user taskomatic, same configuration), then start them again; "
            "single-instance installs may set auto_migrate = yes in [database] instead")


class SchemaOutOfDate(Exception):
    pass
