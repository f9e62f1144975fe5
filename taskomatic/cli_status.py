"""``taskomatic status`` and ``taskomatic instances``: what runs, and who runs it."""

from __future__ import annotations

import argparse
from typing import Any

from taskomatic.cli_common import EXIT_NOT_RUNNING, fmt_age, fmt_time, positive_int, print_json, session
from taskomatic.config import Config
from taskomatic.db import operator

# A standalone instance has no lease: it counts as live while its supervisor's
# heartbeat (every 10 s, runtime/supervisor.py HEARTBEAT_INTERVAL) is younger
# than three intervals.
SILENT_AFTER = 30.0
# `taskomatic instances` without --all leaves out instances that are not live,
# hold nothing and were last heard from longer ago than this.
RECENT = 3600.0


def add_parsers(sub: Any, common: Any) -> None:
    """The status and instances subcommands; ``common`` adds the global options to each."""
    status = sub.add_parser("status", help="instances, queue depth, oldest queued task, running tasks; "
                                           "exits 3 when no instance is live",
                            description="Live instances, queued and running counts, the oldest queued task "
                                        "and what runs now. Exit 0 when an instance is live, 3 when none is.")
    common(status)
    status.add_argument("--json", action="store_true", help="one JSON document (see README, JSON output)")

    # "keys" in the help stays until the man page (packaging/man, generated from this help) is regenerated.
    instances = sub.add_parser(
        "instances", help="daemon instances: state, heartbeat, lease, keys and tasks held",
        description="List daemon instances, newest first. Without --all: those that are live, still hold "
                    "keys or tasks, or were heard from in the last hour.")
    common(instances)
    instances.add_argument("--all", action="store_true", help="every instance, also long stopped or dead ones")
    instances.add_argument("--limit", type=positive_int, default=50, help="most instances listed (default 50)")
    instances.add_argument("--json", action="store_true", help="one JSON document (see README, JSON output)")


def cmd_status(config: Config, as_json: bool) -> int:
    with session(config, "status", read_only=True) as store:
        instances = operator.live_instances(store)
        counts = operator.active_counts(store)
        oldest = operator.oldest_queued(store)
        running = operator.running_tasks(store)
    live = any(float(i["heartbeat_age"]) < SILENT_AFTER for i in instances)
    code = 0 if live else EXIT_NOT_RUNNING
    if as_json:
        print_json({"live": live, "instances": instances, "tasks": counts, "oldest_queued": oldest,
                    "running": running})
        return code
    print("instances:")
    for i in instances:
        age = float(i["heartbeat_age"])
        health = "alive" if age < SILENT_AFTER else f"silent for {age:.0f} s"
        print(f"  #{i['id']} {i['hostname']} pid {i['pid']} {i['mode']}, {i['shards']} shards, "
              f"v{i['version']}, since {fmt_time(i['started_at'])}: {health}")
    if not instances:
        print("  none running")
    print(f"tasks: {counts.get('queued', 0)} queued, {counts.get('running', 0)} running")
    if oldest:
        print(f"oldest queued: task {oldest['id']} ({oldest['action']} {oldest['task_target_type']}:"
              f"{oldest['task_target_id']}), waiting {float(oldest['age']):.1f} s")
    for r in running:
        print(f"  running: task {r['id']} {r['action']} {r['task_target_type']}:{r['task_target_id']} "
              f"for {float(r['seconds'] or 0):.1f} s (instance {r['claimed_by']}, attempt {r['attempts']})")
    if not live:
        print("no instance is live (exit 3)")
    return code


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
    return bool(row["partitions_held"] or row["tasks_claimed"] or row["tasks_running"])


def _fmt_partitions(row: dict[str, Any]) -> str:
    """Partitions held, and how many of them are being handed over."""
    releasing = row["partitions_releasing"]
    return f"{row['partitions_held']} ({releasing} handing over)" if releasing else str(row["partitions_held"])


def _fmt_lease(left: float | None) -> str:
    if left is None:
        return "-"
    return f"{fmt_age(left)} left" if left > 0 else f"ran out {fmt_age(-left)} ago"


_INSTANCE_HEADER = ("ID", "HOSTNAME", "PID", "MODE", "SHARDS", "STARTED", "STATE", "HEARTBEAT", "LEASE",
                    "PARTITIONS", "CLAIMED", "RUNNING")


def cmd_instances(config: Config, args: argparse.Namespace) -> int:
    with session(config, "instances", read_only=True) as store:
        # Without --all the selection is made here, so every row is read (a
        # long-lived instance can be older than many short-lived ones).
        rows = operator.all_instances(store, limit=args.limit if args.all else None)
    for row in rows:
        for name in ("heartbeat_age", "lease_left"):
            row[name] = None if row[name] is None else float(row[name])
        for name in ("partitions_held", "partitions_releasing", "tasks_claimed", "tasks_running"):
            row[name] = int(row[name])
        row["state"] = _instance_state(row)
    chosen = rows if args.all else [
        r for r in rows if r["state"] == "live" or _holds(r) or r["heartbeat_age"] < RECENT]
    shown = chosen[:args.limit]
    if args.json:
        print_json({"instances": shown})
        return 0
    lines = [_INSTANCE_HEADER]
    for r in shown:
        lines.append((f"#{r['id']}", r["hostname"], str(r["pid"]), r["mode"], str(r["shards"]),
                      fmt_time(r["started_at"]), r["state"], f"{fmt_age(r['heartbeat_age'])} ago",
                      _fmt_lease(r["lease_left"]), _fmt_partitions(r), str(r["tasks_claimed"]),
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
                (r["partitions_held"], "partition"), (r["tasks_claimed"], "claimed task"),
                (r["tasks_running"], "running task")) if n)
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
