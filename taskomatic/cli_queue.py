"""The queue commands: ``submit``, ``tasks``, ``show``, ``cancel``, ``retry`` and ``actions``."""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import signal
import sys
import threading
from typing import Any

import psycopg2

from taskomatic.cli_common import (
    TARGET_FLAGS,
    TASK_STATES,
    fmt_age,
    fmt_time,
    positive_int,
    print_json,
    session,
    target_arg,
)
from taskomatic.config import Config
from taskomatic.db import operator
from taskomatic.db import retention as retention_db
from taskomatic.exitcodes import EXIT_FAILED, EXIT_USAGE


def add_parsers(sub: Any, common: Any) -> None:
    """The queue subcommands; ``common`` adds the global options to each."""
    submit = sub.add_parser("submit", help="queue a task (checked against the installed actions)")
    common(submit)
    submit.add_argument("action", help="action name, e.g. start_vm (`taskomatic actions` lists them)")
    target = submit.add_mutually_exclusive_group(required=True)
    for flag, kind in TARGET_FLAGS:
        target.add_argument(f"--{flag}", type=int, metavar="ID", help=f"target a {kind}")
    submit.add_argument("--args", default="{}", help="action arguments as a JSON object, e.g. '{\"host_id\": 3}'")
    submit.add_argument("--by", default="taskomatic submit", help="submitted_by text (default: taskomatic submit)")

    tasks = sub.add_parser("tasks", help="list tasks, newest first")
    common(tasks)
    _filters(tasks, TASK_STATES)
    tasks.add_argument("--limit", type=positive_int, default=50, help="most tasks listed (default 50)")
    tasks.add_argument("--json", action="store_true",
                       help="one JSON array (with --follow: one JSON object per line, as tasks change)")
    tasks.add_argument("--follow", action="store_true",
                       help="after the list, print tasks as they are queued and as they end (Ctrl-C stops)")
    tasks.add_argument("--archive", action="store_true",
                       help="list archived tasks (ended ones moved out after [retention] keep_finished)")

    show = sub.add_parser("show", help="everything about one task: args, attempts, message, holder, timings "
                                       "(an archived task too)")
    common(show)
    show.add_argument("task_id", type=int, metavar="ID", help="the task's id")
    show.add_argument("--json", action="store_true", help="one JSON document (see README, JSON output)")

    for name, verb, states in (("cancel", "cancel queued tasks", ("queued",)),
                               ("retry", "queue failed or canceled tasks again, each at the end of its "
                                         "key's queue", ("failed", "canceled"))):
        command = sub.add_parser(name, help=f"{verb}: by id, or every task a filter selects (with --yes)")
        common(command)
        command.add_argument("task_ids", type=int, nargs="*", metavar="ID", help="task ids")
        _filters(command, states)
        command.add_argument("--yes", action="store_true",
                             help="with a filter: do it (without --yes, only count and list what matches)")

    actions = sub.add_parser("actions", help="list the installed actions, their target types and arguments")
    common(actions)
    actions.add_argument("--json", action="store_true", help="one JSON array")


def _filters(parser: argparse.ArgumentParser, states: tuple[str, ...]) -> None:
    parser.add_argument("--state", choices=states, help="only tasks in this state")
    parser.add_argument("--action", help="only tasks of this action")
    parser.add_argument("--target", type=target_arg, metavar="TYPE[:ID]",
                        help="only tasks on this target, e.g. Vm:12, or on every target of a type, e.g. Vm")
    for flag, kind in TARGET_FLAGS:
        parser.add_argument(f"--{flag}", type=int, metavar="ID",
                            help=f"only tasks on this {kind} (= --target {kind}:ID)")


def _target_filter(args: argparse.Namespace) -> tuple[str | None, int | None]:
    chosen = [(kind, getattr(args, flag)) for flag, kind in TARGET_FLAGS if getattr(args, flag) is not None]
    if args.target is not None:
        chosen.append(args.target)
    if len(chosen) > 1:
        raise UsageError("give one target (--target or one of --vm, --pool, --volume, --host)")
    return chosen[0] if chosen else (None, None)


class UsageError(Exception):
    """A command line that is well-formed but asks for something impossible."""


# -- submit, actions ------------------------------------------------------------------------------------


def _describe(action: Any) -> dict[str, Any]:
    doc = (type(action).__doc__ or "").strip().splitlines()
    allowed = getattr(action, "allowed_args", None)
    return {"name": action.name, "target_types": list(action.target_types),
            "args": sorted(allowed) if allowed is not None else None,
            "description": doc[0] if doc else ""}


def cmd_actions(as_json: bool) -> int:
    from taskomatic.actions.registry import load_actions

    described = [_describe(a) for _, a in sorted(load_actions().items())]
    if as_json:
        print_json(described)
        return 0
    width = max(len(d["name"]) for d in described)
    for d in described:
        args = ", ".join(d["args"]) if d["args"] else ("none" if d["args"] is not None else "(not declared)")
        print(f"{d['name']:<{width}}  {'/'.join(d['target_types']):<13}  args: {args}")
        if d["description"]:
            print(f"{'':<{width}}  {d['description']}")
    return 0


def _check_submission(action_name: str, target_type: str, task_args: dict[str, Any]) -> str | None:
    """Why the installed actions refuse this task, or None."""
    from taskomatic.actions.base import TaskFailed
    from taskomatic.actions.registry import load_actions

    installed = load_actions()
    action = installed.get(action_name)
    if action is None:
        close = difflib.get_close_matches(action_name, list(installed), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"no action named {action_name!r}{hint} (`taskomatic actions` lists them)"
    if target_type not in action.target_types:
        flags = ", ".join(f"--{f}" for f, k in TARGET_FLAGS if k in action.target_types)
        return f"{action_name} acts on {'/'.join(action.target_types)}, not {target_type} (use {flags})"
    try:
        action.validate_args(task_args)
    except TaskFailed as exc:
        return str(exc)
    return None


def cmd_submit(config: Config, args: argparse.Namespace) -> int:
    import json

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
    refusal = _check_submission(args.action, target_type, task_args)
    if refusal:
        print(f"taskomatic: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    with session(config, "submit") as store:
        try:
            with store.transaction():
                task_id = operator.submit_task(store, target_type, target_id, args.action, task_args, args.by)
        except psycopg2.DataError as exc:  # e.g. a \u0000 that jsonb cannot store
            print(f"taskomatic: the database refused the task: {str(exc).strip().splitlines()[0]}",
                  file=sys.stderr)
            return EXIT_USAGE
    print(task_id)
    return 0


# -- tasks, show ----------------------------------------------------------------------------------------


def cmd_tasks(config: Config, args: argparse.Namespace) -> int:
    target_type, target_id = _target_filter(args)
    if args.archive and args.follow:
        raise UsageError("--archive lists tasks that ended long ago: nothing to --follow there")
    lister = retention_db.list_archived if args.archive else operator.list_tasks
    with session(config, "tasks", read_only=True) as store:
        rows = lister(store, args.state, target_type, target_id, args.action, args.limit)
        if args.follow:
            _print_tasks(rows, args.json, json_lines=True)
            _follow(store, args.json, last_id=max((r["id"] for r in rows), default=0))
            return 0
    _print_tasks(rows, args.json)
    return 0


_HEADER = ("ID", "STATE", "ACTION", "TARGET", "STARTED", "ENDED", "MESSAGE")
_WIDTHS = (8, 9, 14, 18, 23, 23)


def _print_tasks(rows: list[dict[str, Any]], as_json: bool, header: bool = True, json_lines: bool = False) -> None:
    if as_json:
        if json_lines:
            for row in rows:
                print_json(row, indent=None)
        else:
            print_json(rows)
        return
    lines = [_HEADER] if header else []
    for r in rows:
        lines.append((str(r["id"]), r["state"], r["action"], f"{r['task_target_type']}:{r['task_target_id']}",
                      fmt_time(r["time_started"]), fmt_time(r["time_ended"]), (r["message"] or "")[:80]))
    for line in lines:
        cells = [cell.ljust(max(w, len(_HEADER[i]))) for i, (cell, w) in enumerate(zip(line, _WIDTHS, strict=False))]
        print("  ".join(cells) + "  " + line[-1], flush=True)


def _follow(store: Any, as_json: bool, last_id: int) -> None:
    """Print tasks as they are queued and end, until Ctrl-C (SIGINT) or SIGTERM.

    The signals only set an event the loop waits on, so they end it between two
    turns, never in the middle of a query or of a line being printed (a
    KeyboardInterrupt could land in either)."""
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda _signum, _frame: stop.set())
                for signum in (signal.SIGINT, signal.SIGTERM)}
    since = dt.datetime.now(dt.UTC)
    try:
        while not stop.is_set():
            rows = operator.tasks_changed_since(store, last_id, since)
            store.rollback()
            if rows:
                _print_tasks(rows, as_json, header=False, json_lines=True)
                last_id = max(last_id, *(r["id"] for r in rows))
                since = max([since, *(r["time_ended"] for r in rows if r["time_ended"] is not None)])
            stop.wait(1.0)  # a terminal refresh interval
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    with session(config, "show", read_only=True) as store:
        task = operator.task_details(store, args.task_id)
        archived = task is None
        if archived:
            task = retention_db.archived_task_details(store, args.task_id)
    if task is None:
        print(f"taskomatic: no task {args.task_id}", file=sys.stderr)
        return EXIT_FAILED
    if archived:  # it ended long ago: nobody holds it, nothing is ahead of it
        task.update(ahead_in_key=0, holder_hostname=None, holder_pid=None, holder_mode=None,
                    holder_stopped_at=None, holder_heartbeat_age=None)
    holder = None
    if task["claimed_by"] is not None and not archived:
        holder = {"instance": task["claimed_by"], "hostname": task["holder_hostname"], "pid": task["holder_pid"],
                  "mode": task["holder_mode"], "stopped_at": task["holder_stopped_at"],
                  "heartbeat_age": task["holder_heartbeat_age"], "claimed_at": task["claimed_at"],
                  "shard": task["run_by_shard"]}
    document = {k: task[k] for k in ("id", "state", "action", "task_target_type", "task_target_id", "args",
                                     "message", "submitted_by", "attempts", "created_at", "time_started",
                                     "time_ended", "waited_seconds", "ran_seconds", "parent_task_id",
                                     "child_task_ids", "ahead_in_key")}
    document["ordering_key"] = f"{task['key_type']}:{task['key_id']}" if task["key_type"] else None
    document["holder"] = holder
    document["archived"] = archived
    if args.json:
        print_json(document)
        return 0
    print(f"task {task['id']}: {task['action']} {task['task_target_type']}:{task['task_target_id']} - "
          f"{task['state']}" + (" (archived)" if archived else ""))
    print(f"  args:          {_json_text(task['args'])}")
    print(f"  submitted by:  {task['submitted_by'] or '-'}")
    print(f"  ordering key:  {document['ordering_key'] or '-'}"
          + (f" ({task['ahead_in_key']} unfinished tasks ahead)" if task["ahead_in_key"] else ""))
    print(f"  attempts:      {task['attempts']}")
    print(f"  created:       {fmt_time(task['created_at'])}")
    print(f"  started:       {fmt_time(task['time_started'])}"
          + (f" (waited {fmt_age(task['waited_seconds'])})" if task["time_started"] else ""))
    print(f"  ended:         {fmt_time(task['time_ended'])}"
          + (f" (ran {fmt_age(task['ran_seconds'])})" if task["time_ended"] and task["time_started"] else ""))
    if holder:
        gone = f", stopped {fmt_time(holder['stopped_at'])}" if holder["stopped_at"] else ""
        shard = f", shard {holder['shard']}" if holder["shard"] is not None else ""
        print(f"  holder:        instance {holder['instance']} ({holder['hostname']} pid {holder['pid']}, "
              f"{holder['mode']}{shard}{gone}), claimed {fmt_time(holder['claimed_at'])}")
    else:
        print("  holder:        -")
    if task["parent_task_id"]:
        print(f"  queued by:     task {task['parent_task_id']}")
    if task["child_task_ids"]:
        print(f"  queued:        tasks {', '.join(map(str, task['child_task_ids']))}")
    print("  message:" + ("       -" if not task["message"] else ""))
    for line in (task["message"] or "").splitlines():
        print(f"    {line}")
    return 0


def _json_text(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


# -- cancel, retry --------------------------------------------------------------------------------------


def cmd_cancel_or_retry(config: Config, args: argparse.Namespace) -> int:
    canceling = args.command == "cancel"
    states = [args.state] if args.state else (["queued"] if canceling else ["failed", "canceled"])
    target_type, target_id = _target_filter(args)
    by_filter = args.action is not None or target_type is not None or args.state is not None
    if by_filter == bool(args.task_ids):
        raise UsageError(f"{args.command}: give task ids or a filter (--action, --target, --state), not "
                         f"{'both' if by_filter else 'neither'}")
    verb = "cancel" if canceling else "retry"
    with session(config, args.command) as store:
        if by_filter:
            ids = operator.matching_tasks(store, states, target_type, target_id, args.action)
            store.rollback()
            if not ids:
                print(f"no task matches; nothing to {verb}")
                return 0
            if not args.yes:
                shown = ", ".join(map(str, ids[:20])) + (", ..." if len(ids) > 20 else "")
                print(f"{len(ids)} tasks match ({shown}); add --yes to {verb} them")
                return EXIT_FAILED
        else:
            ids = args.task_ids
        with store.transaction():
            if canceling:
                done = operator.cancel_tasks(store, ids, "canceled by taskomatic cancel")
                new_ids: list[int] = []
            else:
                done = sorted(set(ids) & _retryable(store, ids))
                new_ids = operator.retry_tasks(store, done)
            refused = {i: operator.task_state(store, i) for i in ids if i not in done}
    rule = "only queued tasks can be canceled" if canceling else "only failed or canceled tasks can be retried"
    for task_id, state in refused.items():
        why = f"no task {task_id}" if state is None else f"task {task_id} is {state}; {rule}"
        print(f"taskomatic: {why}", file=sys.stderr)
    if canceling:
        for task_id in done:
            print(f"task {task_id} canceled")
    else:
        for old, new in zip(done, new_ids, strict=True):
            print(f"task {old} queued again as task {new}")
    if by_filter:
        print(f"{len(done)} of {len(ids)} tasks {'canceled' if canceling else 'queued again'}")
    return EXIT_FAILED if refused else 0


def _retryable(store: Any, ids: list[int]) -> set[int]:
    return {i for i in ids if operator.task_state(store, i) in ("failed", "canceled")}
