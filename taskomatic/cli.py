"""The ``taskomatic`` command line.

``taskomatic [--shards N] [--config F]`` runs the daemon in the foreground
(systemd style); subcommands manage the database and the queue.

Exit codes (taskomatic/exitcodes.py): 0 success; 1 the command failed (for
example cancel of a task that is not queued); 2 usage error; 3 bad
configuration, no database configured, or (``status``) no live instance; 4
database unreachable; 5 another standalone instance holds the database; 6 a
daemon process kept failing to start; 8 schema out of date; 9 the database
refused us (password, pg_hba.conf, no such role or database).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from taskomatic import __version__, cli_queue, cli_status
from taskomatic import config as config_mod
from taskomatic.capacity import cli as capacity_cli
from taskomatic.cli_common import NoDatabase, database, fmt_time, print_json, session
from taskomatic.config import Config, ConfigError
from taskomatic.exitcodes import EXIT_CONFIG, EXIT_DATABASE, EXIT_SCHEMA, EXIT_USAGE
from taskomatic.logsetup import setup_logging

log = logging.getLogger(__name__)

# The daemon needs no privilege: libvirt and PostgreSQL are reached through their sockets
# with their own access control. Root is allowed (a quick try, the demo) but warned about.
ROOT_WARNING = ("running as root: taskomatic needs no privileges (the packaged unit runs it as user "
                "taskomatic); run it as an unprivileged user that may use the libvirt and database sockets")

EXIT_HELP = ("exit codes: 0 ok, 1 failed, 2 usage, 3 bad configuration or no database configured (status: no "
             "live instance), 4 database unreachable, 5 another standalone instance is running, 6 a daemon "
             "process kept failing to start, 8 schema out of date (run taskomatic db upgrade), 9 the database "
             "refused us (password, pg_hba.conf, role or database missing)")

# Global options that only some commands use: any other command refuses them rather than ignore them.
# demo runs its own private PostgreSQL in a temporary directory, so it takes no database options.
# bench takes --dsn only: a server to create its own database on (its default is a private PostgreSQL).
_DATABASE_COMMANDS = ("run", "db", "submit", "tasks", "show", "cancel", "retry", "status", "instances", "plan")
ONLY_FOR = {
    "shards": ("run", "demo"),
    "mode": ("run",),
    "routing": ("run",),
    "dsn": (*_DATABASE_COMMANDS, "bench"),
    "embedded_db": _DATABASE_COMMANDS,
    "state_dir": _DATABASE_COMMANDS,
}
FLAG_OF = {"shards": "--shards", "mode": "--mode", "routing": "--routing", "dsn": "--dsn",
           "embedded_db": "--embedded-db", "state_dir": "--state-dir"}


def _common_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a subcommand's unset option from hiding the same option
    # given before the subcommand.
    s = argparse.SUPPRESS
    parser.add_argument("--config", metavar="FILE", default=s,
                        help=f"configuration file (default {config_mod.DEFAULT_CONFIG_PATH} if present; "
                             "FILE.d/*.conf are read after it)")
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


def _daemon_options(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument("--shards", type=int, default=s, help="shard processes (tasks of different resources "
                                                              "run in parallel, one per shard)")
    parser.add_argument("--mode", choices=["standalone", "multihost"], default=s,
                        help="standalone refuses to share the database; multihost shares it")
    parser.add_argument("--routing", choices=["hash", "pinned"], default=s,
                        help="which shard runs a key's tasks: pinned (any shard with room, kept while the key "
                             "has tasks in flight there) or hash (always shard partition mod shards)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskomatic",
        description="Run queued virtualization tasks from PostgreSQL on libvirt nodes. "
                    "Without a subcommand, runs the daemon in the foreground.",
        epilog=EXIT_HELP,
    )
    parser.add_argument("--version", action="version", version=f"taskomatic {__version__}")
    _common_options(parser)
    _daemon_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground (the default)")
    _common_options(run)
    _daemon_options(run)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    upgrade = db_sub.add_parser("upgrade", help="create or upgrade the schema (safe to run twice)")
    _common_options(upgrade)
    upgrade.add_argument("--dry-run", action="store_true", help="list pending migrations only")
    prune = db_sub.add_parser(
        "prune", help="archive or delete ended tasks past [retention] keep_finished now (the daemon does it "
                      "every retention_interval), and prune the archive past archive_keep",
        description="Applies the [retention] settings (--set retention.keep_finished=30d ... changes them "
                    "for this run) until nothing is left; one instance or command at a time (it waits for "
                    "a daemon's batch to end).")
    _common_options(prune)
    prune.add_argument("--dry-run", action="store_true", help="count what would go, change nothing")
    prune.add_argument("--json", action="store_true", help="one JSON object")

    cli_queue.add_parsers(sub, _common_options)
    cli_status.add_parsers(sub, _common_options)
    capacity_cli.add_parsers(sub, _common_options)

    demo = sub.add_parser("demo", help="run a demo fleet on a private PostgreSQL and libvirt nodes",
                          description="Everything on private servers in a temporary directory: no database "
                                      "options; --config, --set and --log-level reach the demo's daemon.")
    _common_options(demo)
    demo.add_argument("--vms", type=int, default=200, help="VMs in the fleet (default 200)")
    demo.add_argument("--tasks", type=int, default=2000, help="tasks queued (default 2000)")
    demo.add_argument("--shards", type=int, default=argparse.SUPPRESS, help="shard processes (default 4)")
    demo.add_argument("--nodes", type=int, default=2, help="libvirt nodes (default 2)")
    demo.add_argument("--seed", type=int, default=1, help="random seed of the workload (default 1)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--keep", action="store_true",
                      help="keep the demo directory and leave its PostgreSQL running (to plan from its history)")
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = config_mod.parse_overrides(getattr(args, "settings", []) or [])
    for name in ("dsn", "state_dir", "log_level", "shards", "mode", "routing"):
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


def refused_global_option(args: argparse.Namespace) -> str | None:
    """A global option the chosen command would not use (refused, never silently ignored)."""
    command = args.command or "run"
    for name, commands in ONLY_FOR.items():
        if hasattr(args, name) and command not in commands:
            users = ", ".join(commands)
            return f"{FLAG_OF[name]} has no effect on '{command}' (it applies to: {users})"
    return None


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


def cmd_db_prune(config: Config, dry_run: bool, as_json: bool) -> int:
    from taskomatic import retention

    policy = retention.Policy.from_config(config)
    with session(config, "db prune") as store:
        if dry_run:
            report = retention.dry_run(store, policy)
        else:
            result = retention.run_pass(store, policy, wait=True)  # a daemon's batch is short
            report = {"policy": policy.describe(), ("archived" if policy.archive else "deleted"): result.moved,
                      "deleted_from_archive": result.archive_pruned}
    if as_json:
        print_json(report)
        return 0
    for name, value in report.items():
        shown = fmt_time(value) if name == "oldest_end" else value
        print(f"{name.replace('_', ' ')}: {shown}")
    return 0


def _dispatch(config: Config, args: argparse.Namespace) -> int:
    command = args.command
    if command in (None, "run"):
        return cmd_run(config)
    if command == "db" and args.db_command == "prune":
        return cmd_db_prune(config, args.dry_run, args.json)
    if command == "db":
        return cmd_db_upgrade(config, args.dry_run)
    if command == "submit":
        return cli_queue.cmd_submit(config, args)
    if command == "tasks":
        return cli_queue.cmd_tasks(config, args)
    if command == "show":
        return cli_queue.cmd_show(config, args)
    if command in ("cancel", "retry"):
        return cli_queue.cmd_cancel_or_retry(config, args)
    if command == "actions":
        return cli_queue.cmd_actions(args.json)
    if command == "status":
        return cli_status.cmd_status(config, args.json)
    if command == "instances":
        return cli_status.cmd_instances(config, args)
    if command == "plan":
        return capacity_cli.cmd_plan(config, args)
    if command == "bench":
        return capacity_cli.cmd_bench(config, args)
    if command == "demo":
        from taskomatic.demo import run_demo

        return run_demo(config, args)
    raise cli_queue.UsageError(f"unknown command {command}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refused = refused_global_option(args)
    if refused:
        parser.error(refused)
    try:
        config = resolve_config(args)
    except ConfigError as exc:
        print(f"taskomatic: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level, role="supervisor" if args.command in (None, "run") else "cli")
    for deprecated in config_mod.deprecated_settings_warnings(config):
        logging.getLogger("taskomatic").warning("%s", deprecated)
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
        return _dispatch(config, args)
    except cli_queue.UsageError as exc:
        print(f"taskomatic: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
