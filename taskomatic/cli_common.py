"""What every ``taskomatic`` subcommand shares: the database it uses, and one output convention.

JSON (``--json``): one document per command (an object, or an array for
lists), times in ISO 8601 with their time zone (UTC), durations and ages as
seconds, counts and ids as numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import decimal
import json
from collections.abc import Iterator
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from taskomatic import config as config_mod
from taskomatic.config import Config
from taskomatic.exitcodes import EXIT_CONFIG, EXIT_DATABASE

if TYPE_CHECKING:
    from taskomatic.db.store import Store

# `status` with no live instance, as `systemctl status` and `pg_ctl status` exit (LSB "not running").
EXIT_NOT_RUNNING = 3

# (flag, task_target_type): --vm ID and the others pick a target.
TARGET_FLAGS = (("vm", "Vm"), ("pool", "StoragePool"), ("volume", "StorageVolume"), ("host", "Host"))
TASK_STATES = ("queued", "running", "finished", "failed", "canceled")


class NoDatabase(Exception):
    """No database is configured, or the private one a read-only command needs is not running."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def database(config: Config, read_only: bool = False, purpose: str = "") -> Iterator[Config]:
    """The configured database; never one nobody asked for.

    An empty dsn is refused with what to write where. dsn = embedded is the
    private PostgreSQL under the state directory: started if needed (and
    stopped afterwards if we started it) with its schema kept current, except
    for a read-only command, which only uses it when it runs already.
    """
    if not config.dsn:
        raise NoDatabase(config_mod.missing_dsn_message(config), EXIT_CONFIG)
    if not config.embedded:
        yield config
        return
    from taskomatic.embedded.postgres import EmbeddedPostgres

    server = EmbeddedPostgres(config.resolved_state_dir() / "postgres", user=config.embedded_user or None)
    if read_only:
        if not (server.socket_dir / f".s.PGSQL.{server.port}").exists():
            raise NoDatabase(f"the private PostgreSQL (dsn = embedded) under {server.base_dir} is not running, "
                             "so there is nothing to show; it runs while a daemon started with --embedded-db does",
                             EXIT_NOT_RUNNING if purpose == "status" else EXIT_DATABASE)
        yield with_dsn(config, server.dsn)
        return
    server.start()
    try:
        from taskomatic.db import migrate
        from taskomatic.db.store import connect

        conn = connect(server.dsn, "taskomatic upgrade", config.connect_timeout)
        try:
            migrate.upgrade(conn)
        finally:
            conn.close()
        yield with_dsn(config, server.dsn)
    finally:
        if server.started_by_us:
            server.stop()


def with_dsn(config: Config, dsn: str) -> Config:
    """The configuration with the private server's real dsn, kept as an override so a reload keeps it."""
    overrides = tuple(sorted({**dict(config.overrides), "dsn": dsn}.items()))
    return Config(**{**{f.name: getattr(config, f.name) for f in fields(config)}, "dsn": dsn,
                     "overrides": overrides})


def open_store(config: Config, purpose: str) -> Store:
    """A connection for a CLI command, refused (SchemaOutOfDate) if the schema is not current."""
    from taskomatic.db import migrate
    from taskomatic.db.store import Store

    store = Store.open(config.dsn, f"taskomatic {purpose}", config.connect_timeout)
    try:
        migrate.check_current(store.conn)
    except migrate.SchemaOutOfDate:
        store.close()
        raise
    return store


@contextlib.contextmanager
def session(config: Config, purpose: str, read_only: bool = False) -> Iterator[Store]:
    """The database for one command, opened and closed around it."""
    with database(config, read_only=read_only, purpose=purpose) as resolved:
        store = open_store(resolved, purpose)
        try:
            yield store
        finally:
            store.close()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def target_arg(text: str) -> tuple[str, int | None]:
    """--target TYPE[:ID], e.g. Vm:12 or StoragePool."""
    kind, _, ident = text.partition(":")
    known = [k for _, k in TARGET_FLAGS]
    if kind not in known:
        raise argparse.ArgumentTypeError(f"target type must be one of {', '.join(known)}, got {kind!r}")
    try:
        return kind, int(ident) if ident else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"target id must be a number, got {ident!r}") from None


def jsonable(value: Any) -> Any:
    """The JSON convention: ISO 8601 times with time zone (UTC), numbers as numbers."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:  # timestamp without time zone: taskomatic stores none, but be explicit
            return value.isoformat()
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        exponent = value.as_tuple().exponent
        return int(value) if isinstance(exponent, int) and exponent >= 0 else float(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def print_json(document: Any, indent: int | None = 2) -> None:
    print(json.dumps(jsonable(document), indent=indent, ensure_ascii=False), flush=True)


def fmt_time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if value is not None else "-"


def fmt_age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f} s"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
