"""The ``taskomatic`` command line.

``taskomatic [--shards N] [--config F]`` runs the daemon in the foreground
(systemd style); subcommands manage the database and the queue.

Exit codes: 0 success; 1 the command failed (for example cancel of a task
that is not queued); 2 usage error; 3 bad configuration; 4 database
unreachable or schema out of date; 5 another standalone instance holds the
database; 6 a daemon process kept failing to start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import psycopg2

from taskomatic import __version__
from taskomatic import config as config_mod
from taskomatic.config import Config, ConfigError
from taskomatic.exitcodes import EXIT_CONFIG, EXIT_DATABASE, EXIT_FAILED, EXIT_SCHEMA, EXIT_USAGE
from taskomatic.logsetup import setup_logging

if TYPE_CHECKING:
    from taskomatic.db.store import Store

log = logging.getLogger(__name__)

# `status` with no live instance, as `systemctl status` and `pg_ctl status` exit (LSB "not running").
EXIT_NOT_RUNNING = 3

# The daemon needs no privilege: libvirt and PostgreSQL are reached through their sockets
# with their own access control. Root is allowed (a quick try, the demo) but warned about.
ROOT_WARNING = ("running as root: taskomatic needs no privileges (the packaged unit runs it as user "
                "taskomatic); run it as an unprivileged user that may use the libvirt and database sockets")

TARGET_FLAGS = (("vm", "Vm"), ("pool", "StoragePool"), ("volume", "StorageVolume"), ("host", "Host"))

# A standalone instance has no lease: it counts as live while its supervisor's
# heartbeat (every 10 s, runtime/supervisor.py HEARTBEAT_INTERVAL) is younger
# than three intervals.
SILENT_AFTER = 30.0
# `taskomatic instances` without --all leaves out instances that are not live,
# hold nothing and were last heard from longer ago than this.
RECENT = 3600.0


def _common_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a subcommand's unset option from hiding the same option
    # given before the subcommand.
    s = argparse.SUPPRESS
    parser.add_argument("--config", metavar="FILE", default=s,
                        help=f"configuration file (default {config_mod.DEFAULT_CONFIG_PATH} if present)")
    parser.add_argument("--dsn", default=s,
                        help="libpq connection string of the database (overrides TASKOMATIC_DSN and the file)")
    parser.add_argument("--embedded-db", dest="embedded_db", action="store_true", default=s,
                        help="use a private PostgreSQL under the state directory (dsn = embedded): a trial on "
                             "one machine, not a fleet; read-only commands use it only if it is running")
    parser.add_argument("--state-dir", dest="state_dir", default=s,
                        help="state directory (systemd's $STATE_DIRECTORY wins; default /var/lib/taskomatic "
                             "as root, else $XDG_STATE_HOME/taskomatic)")
    parser.add_argument("--log-level", dest="log_level", default=s,
                        choices=["debug", "info", "warning", "error"], help="least severe messages logged")
    parser.add_argument("--set", dest="settings", action="append", metavar="SECTION.NAME=VALUE",
                        default=s, help="override any setting (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskomatic",
        description="Run queued virtualization tasks from PostgreSQL on libvirt nodes. "
                    "Without a subcommand, runs the daemon in the foreground.",
        epilog="exit codes: 0 ok, 1 failed, 2 usage, 3 bad configuration, 4 database unavailable "
               "or schema out of date, 5 another standalone instance is running, 6 a daemon "
               "process kept failing to start",
    )
    parser.add_argument("--version", action="version", version=f"taskomatic {__version__}")
    _common_options(parser)
    parser.add_argument("--shards", type=int, default=argparse.SUPPRESS, help="shard processes")
    parser.add_argument("--mode", choices=["standalone", "multihost"], default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground (the default)")
    _common_options(run)
    run.add_argument("--shards", type=int, default=argparse.SUPPRESS, help="shard processes")
    run.add_argument("--mode", choices=["standalone", "multihost"], default=argparse.SUPPRESS)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    upgrade = db_sub.add_parser("upgrade", help="create or upgrade the schema (safe to run twice)")
    _common_options(upgrade)
    upgrade.add_argument("--dry-run", action="store_true", help="list pending migrations only")

    submit = sub.add_parser("submit", help="queue a task")
    _common_options(submit)
    submit.add_argument("action", help="action name, e.g. start_vm")
    target = submit.add_mutually_exclusive_group(required=True)
    for flag, kind in TARGET_FLAGS:
        target.add_argument(f"--{flag}", type=int, metavar="ID", help=f"target a {kind}")
    submit.add_argument("--args", default="{}", help="action arguments as a JSON object")
    submit.add_argument("--by", default="taskomatic submit", help="submitted_by text")

    tasks = sub.add_parser("tasks", help="list tasks, newest first")
    _common_options(tasks)
    tasks.add_argument("--state", choices=["queued", "running", "finished", "failed", "canceled"])
    for flag, kind in TARGET_FLAGS:
        tasks.add_argument(f"--{flag}", type=int, metavar="ID", help=f"only tasks on this {kind}")
    tasks.add_argument("--action")
    tasks.add_argument("--limit", type=_positive_int, default=50)
    tasks.add_argument("--json", action="store_true", help="one JSON object per line")
    tasks.add_argument("--follow", action="store_true",
                       help="after the list, print tasks as they are queued and as they end (Ctrl-C stops)")

    retry = sub.add_parser("retry", help="queue a failed or canceled task again, at the end of its key's queue")
    _common_options(retry)
    retry.add_argument("task_id", type=int)

    status = sub.add_parser("status", help="instances, queue depth, oldest queued task, running tasks")
    _common_options(status)
    status.add_argument("--json", action="store_true", help="one JSON document")

    instances = sub.add_parser(
        "instances", help="daemon instances: state, heartbeat, lease, keys and tasks held",
        description="List daemon instances, newest first. Without --all: those that are live, still hold "
                    "keys or tasks, or were heard from in the last hour.")
    _common_options(instances)
    instances.add_argument("--all", action="store_true", help="every instance, also long stopped or dead ones")
    instances.add_argument("--limit", type=_positive_int, default=50, help="most instances listed (default 50)")
    instances.add_argument("--json", action="store_true", help="one JSON document")

    cancel = sub.add_parser("cancel", help="cancel a queued task")
    _common_options(cancel)
    cancel.add_argument("task_id", type=int)

    demo = sub.add_parser("demo", help="run a demo fleet on a private PostgreSQL and libvirt nodes")
    _common_options(demo)
    demo.add_argument("--vms", type=int, default=200)
    demo.add_argument("--tasks", type=int, default=2000)
    demo.add_argument("--shards", type=int, default=4)
    demo.add_argument("--nodes", type=int, default=2)
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = config_mod.parse_overrides(getattr(args, "settings", []) or [])
    for name in ("dsn", "state_dir", "log_level", "shards", "mode"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "embedded_db", False):
        if overrides.get("dsn") not in (None, config_mod.EMBEDDED_DSN):
            raise ConfigError("--embedded-db and --dsn name two databases: give one")
        overrides["dsn"] = config_mod.EMBEDDED_DSN
    if overrides.get("dsn"):
        try:
            overrides["dsn"] = config_mod.SETTINGS_BY_NAME["dsn"].parse(overrides["dsn"])
        except ValueError as exc:
            raise ConfigError(f"bad --dsn: {exc}") from None
    if "shards" in overrides and overrides["shards"] < 1:
        raise ConfigError("--shards must be at least 1")
    return config_mod.load(getattr(args, "config", None), overrides=overrides)


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
        yield Config(**{**_fields(config), "dsn": server.dsn})
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
        yield Config(**{**_fields(config), "dsn": server.dsn})
    finally:
        if server.started_by_us:
            server.stop()


def _fields(config: Config) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(config, f.name) for f in fields(config)}


def cmd_run(config: Config) -> int:
    from taskomatic.runtime.supervisor import run_daemon

    with database(config) as resolved:
        return run_daemon(resolved)


def cmd_db_upgrade(config: Config, dry_run: bool) -> int:
    from taskomatic.db import migrate
    from taskomatic.db.store import connect

    with database(config) as resolved:
        conn = connect(resolved.dsn, "taskomatic db upgrade", resolved.connect_timeout)
        try:
            done = migrate.upgrade(conn, dry_run=dry_run)
        finally:
            conn.close()
    verb = "pending" if dry_run else "applied"
    if not done:
        print("schema is up to date")
    for m in done:
        print(f"{verb}: {m.version:04d}_{m.name}")
    return 0


def _open_store(config: Config, purpose: str) -> Store:
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_submit(config: Config, args: argparse.Namespace) -> int:

    try:
        task_args = json.loads(args.args)
    except json.JSONDecodeError as exc:
        print(f"taskomatic: --args is not valid JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(task_args, dict):
        print("taskomatic: --args must be a JSON object, e.g. '{\"host_id\": 3}'", file=sys.stderr)
        return EXIT_USAGE
    target_type, target_id = next((kind, getattr(args, flag)) for flag, kind in TARGET_FLAGS
                                  if getattr(args, flag) is not None)
    with database(config) as resolved:
        store = _open_store(resolved, "submit")
        try:
            with store.transaction():
                task_id = store.scalar("submit_task", target_type=target_type, target_id=target_id,
                                       action=args.action, args=json.dumps(task_args), submitted_by=args.by)
        except psycopg2.DataError as exc:  # e.g. a \u0000 that jsonb cannot store
            print(f"taskomatic: the database refused the task: {str(exc).strip().splitlines()[0]}",
                  file=sys.stderr)
            return EXIT_USAGE
        finally:
            store.close()
    print(task_id)
    return 0


def _fmt_time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if value is not None else "-"


def cmd_tasks(config: Config, args: argparse.Namespace) -> int:

    target_type = target_id = None
    for flag, kind in TARGET_FLAGS:
        if getattr(args, flag) is not None:
            target_type, target_id = kind, getattr(args, flag)
    with database(config, read_only=True) as resolved:
        store = _open_store(resolved, "tasks")
        rows = store.all("list_tasks", state=args.state, target_type=target_type, target_id=target_id,
                         action=args.action, limit=args.limit)
        store.close()
    _print_tasks(rows, args.json)
    if args.follow:
        with database(config, read_only=True) as resolved:
            _follow(resolved, args.json, last_id=max((r["id"] for r in rows), default=0))
    return 0


_HEADER = ("ID", "STATE", "ACTION", "TARGET", "STARTED", "ENDED", "MESSAGE")
_WIDTHS = (8, 9, 14, 18, 23, 23)


def _print_tasks(rows: list[dict[str, Any]], as_json: bool, header: bool = True) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row, default=str), flush=True)
        return
    lines = [_HEADER] if header else []
    for r in rows:
        lines.append((str(r["id"]), r["state"], r["action"], f"{r['task_target_type']}:{r['task_target_id']}",
                      _fmt_time(r["time_started"]), _fmt_time(r["time_ended"]), (r["message"] or "")[:80]))
    for line in lines:
        cells = [cell.ljust(max(w, len(_HEADER[i]))) for i, (cell, w) in enumerate(zip(line, _WIDTHS, strict=False))]
        print("  ".join(cells) + "  " + line[-1], flush=True)


def _follow(config: Config, as_json: bool, last_id: int) -> None:
    import datetime as dt
    import time

    store = _open_store(config, "tasks --follow")
    since = dt.datetime.now(dt.UTC)
    try:
        while True:
            rows = store.all("tasks_changed_since", last_id=last_id, since=since)
            store.rollback()
            if rows:
                _print_tasks(rows, as_json, header=False)
                last_id = max(last_id, *(r["id"] for r in rows))
                since = max([since, *(r["time_ended"] for r in rows if r["time_ended"] is not None)])
            time.sleep(1.0)  # a terminal refresh interval
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


def _change_task(config: Config, task_id: int, purpose: str, query_name: str, rule: str,
                 **params: Any) -> Any:
    """Run a query that changes one task if its state allows; print why not otherwise.

    Returns the query's value (a row or an id), or None after printing the refusal.
    """
    with database(config) as resolved:
        store = _open_store(resolved, purpose)
        with store.transaction():
            changed = store.scalar(query_name, task_id=task_id, **params)
            state = None if changed else store.one("task_states", ids=[task_id])
        store.close()
    if not changed:
        why = f"no task {task_id}" if state is None else f"task {task_id} is {state['state']}; {rule}"
        print(f"taskomatic: {why}", file=sys.stderr)
    return changed


def cmd_cancel(config: Config, task_id: int) -> int:
    if not _change_task(config, task_id, "cancel", "cancel_task", "only queued tasks can be canceled",
                        message="canceled by taskomatic cancel"):
        return EXIT_FAILED
    print(f"task {task_id} canceled")
    return 0


def cmd_retry(config: Config, task_id: int) -> int:
    new_id = _change_task(config, task_id, "retry", "retry_task", "only failed or canceled tasks can be retried")
    if not new_id:
        return EXIT_FAILED
    print(f"task {task_id} queued again as task {new_id}")
    return 0


def cmd_status(config: Config, as_json: bool) -> int:
    with database(config, read_only=True, purpose="status") as resolved:
        store = _open_store(resolved, "status")
        instances = store.all("live_instances")
        counts = {r["state"]: r["n"] for r in store.all("active_counts")}
        oldest = store.one("oldest_queued")
        running = store.all("running_tasks")
        store.close()
    if as_json:
        report = {"instances": instances, "tasks": counts, "oldest_queued": oldest, "running": running}
        print(json.dumps(report, default=str, indent=2))
        return 0
    print("instances:")
    for i in instances:
        age = float(i["heartbeat_age"])
        health = "alive" if age < SILENT_AFTER else f"silent for {age:.0f} s"
        print(f"  #{i['id']} {i['hostname']} pid {i['pid']} {i['mode']}, {i['shards']} shards, "
              f"v{i['version']}, since {_fmt_time(i['started_at'])}: {health}")
    if not instances:
        print("  none running")
    print(f"tasks: {counts.get('queued', 0)} queued, {counts.get('running', 0)} running")
    if oldest:
        print(f"oldest queued: task {oldest['id']} ({oldest['action']} {oldest['task_target_type']}:"
              f"{oldest['task_target_id']}), waiting {float(oldest['age']):.1f} s")
    for r in running:
        print(f"  running: task {r['id']} {r['action']} {r['task_target_type']}:{r['task_target_id']} "
              f"for {float(r['seconds'] or 0):.1f} s (instance {r['claimed_by']}, attempt {r['attempts']})")
    return 0


def _instance_state(row: dict[str, Any]) -> str:
    """live, expired or stopped, judged by the database's clock.

    A multihost instance is live while its lease has time left; a standalone
    one, which has no lease, while its heartbeat is recent. Expired: neither,
    and no clean stop (killed, paused, cut off, or its machine lost).
    """
    if row["stopped_at"] is not None:
        return "stopped"
    if row["mode"] == "multihost":
        return "live" if row["lease_left"] is not None and row["lease_left"] > 0 else "expired"
    return "live" if row["heartbeat_age"] < SILENT_AFTER else "expired"


def _holds(row: dict[str, Any]) -> bool:
    return bool(row["keys_held"] or row["tasks_claimed"] or row["tasks_running"])


def _fmt_age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f} s"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _fmt_lease(left: float | None) -> str:
    if left is None:
        return "-"
    return f"{_fmt_age(left)} left" if left > 0 else f"ran out {_fmt_age(-left)} ago"


_INSTANCE_HEADER = ("ID", "HOSTNAME", "PID", "MODE", "SHARDS", "STARTED", "STATE", "HEARTBEAT", "LEASE",
                    "KEYS", "CLAIMED", "RUNNING")


def cmd_instances(config: Config, args: argparse.Namespace) -> int:
    with database(config, read_only=True) as resolved:
        store = _open_store(resolved, "instances")
        # Without --all the selection is made here, so every row is read (a
        # long-lived instance can be older than many short-lived ones).
        rows = store.all("all_instances", limit=args.limit if args.all else None)
        store.close()
    for row in rows:
        for name in ("heartbeat_age", "lease_left"):
            row[name] = None if row[name] is None else float(row[name])
        for name in ("keys_held", "tasks_claimed", "tasks_running"):
            row[name] = int(row[name])
        row["state"] = _instance_state(row)
    chosen = rows if args.all else [
        r for r in rows if r["state"] == "live" or _holds(r) or r["heartbeat_age"] < RECENT]
    shown = chosen[:args.limit]
    if args.json:
        print(json.dumps({"instances": shown}, default=str, indent=2))
        return 0
    lines = [_INSTANCE_HEADER]
    for r in shown:
        lines.append((f"#{r['id']}", r["hostname"], str(r["pid"]), r["mode"], str(r["shards"]),
                      _fmt_time(r["started_at"]), r["state"], f"{_fmt_age(r['heartbeat_age'])} ago",
                      _fmt_lease(r["lease_left"]), str(r["keys_held"]), str(r["tasks_claimed"]),
                      str(r["tasks_running"])))
    if shown:
        widths = [max(len(line[i]) for line in lines) for i in range(len(_INSTANCE_HEADER))]
        for line in lines:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    else:
        print("no instances" + ("" if args.all else " live or heard from in the last hour"))
    live_multihost = any(r["state"] == "live" and r["mode"] == "multihost" for r in rows)
    for r in shown:
        if r["state"] != "live" and _holds(r):
            held = ", ".join(f"{n} {what}{'s' if n > 1 else ''}" for n, what in (
                (r["keys_held"], "key"), (r["tasks_claimed"], "claimed task"), (r["tasks_running"], "running task"))
                if n)
            then = ("a live multihost instance takes them over" if live_multihost
                    else "no multihost instance is live: the next instance to start takes them over")
            print(f"note: #{r['id']} is {r['state']} but still holds {held}; {then}")
    if len(chosen) > len(shown):
        print(f"({len(chosen) - len(shown)} more not shown; raise --limit)")
    elif args.all and len(rows) == args.limit:
        print(f"(the newest {len(shown)}; there may be more: raise --limit)")
    if len(rows) > len(chosen):
        print(f"({len(rows) - len(chosen)} stopped or dead for over an hour not shown; --all lists them)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve_config(args)
    except ConfigError as exc:
        print(f"taskomatic: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level, role="supervisor" if args.command in (None, "run") else "cli")
    exposed = config_mod.exposed_password_warning(config)
    if exposed:
        logging.getLogger("taskomatic").warning("%s", exposed)
    if args.command in (None, "run") and os.geteuid() == 0:
        logging.getLogger("taskomatic").warning("%s", ROOT_WARNING)
    from taskomatic.db.migrate import SchemaOutOfDate
    from taskomatic.db.store import DatabaseUnavailable
    from taskomatic.embedded.libvirtd import ManagedNodeError
    from taskomatic.embedded.postgres import EmbeddedPostgresError

    try:
        if args.command in (None, "run"):
            return cmd_run(config)
        if args.command == "db":
            return cmd_db_upgrade(config, args.dry_run)
        if args.command == "submit":
            return cmd_submit(config, args)
        if args.command == "tasks":
            return cmd_tasks(config, args)
        if args.command == "cancel":
            return cmd_cancel(config, args.task_id)
        if args.command == "retry":
            return cmd_retry(config, args.task_id)
        if args.command == "status":
            return cmd_status(config, args.json)
        if args.command == "instances":
            return cmd_instances(config, args)
        if args.command == "demo":
            from taskomatic.demo import run_demo

            return run_demo(config, args)
    except NoDatabase as exc:
        print(f"taskomatic: {exc}", file=sys.stderr)
        return exc.exit_code
    except SchemaOutOfDate as exc:
        print(f"taskomatic: {exc}", file=sys.stderr)
        return EXIT_SCHEMA
    except DatabaseUnavailable as exc:
        print(f"taskomatic: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    except (EmbeddedPostgresError, ManagedNodeError) as exc:
        print(f"taskomatic: cannot start a private server: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE
