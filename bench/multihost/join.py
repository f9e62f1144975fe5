"""3. Join and leave under load: an instance joins a loaded one, the partitions balance, then it leaves gracefully.

One instance runs ``sleep`` tasks over many keys (topped up so it stays busy) and holds all P partitions.
A second instance starts: the bench records, on the database clock, from the second instance's
registration (``instances.started_at``) (a) its first acquired partition, (b) its first task started,
(c) the moment it holds its even share (floor(P/2)). Then the second instance gets SIGTERM: (d) how long
until the first holds every partition again. The work drains and the tasks table is checked: every task
ended exactly once (a graceful hand-over re-runs nothing), per-key order held, every partition's tokens
strictly increased over its hand-overs, nothing held once both stopped.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from bench import measure
from bench.harness import check_running, fetch_rows, fetch_scalar, insert_tasks, unfinished
from bench.multihost.suite import (
    ENDED_SQL,
    POLL,
    Ctx,
    Plan,
    db_now,
    ended_once_verdict,
    instance_ids_by_pid,
    instances,
    run_database,
    run_ok,
)
from bench.multihost.takeover import AUDIT_SQL, HELD_SQL
from bench.runners import RunnerFailed
from bench.workloads import PlannedTask


def join_figures(joined_at: float, left_at: float | None, first: set[int], second: set[int], partitions: int,
                 events: list[dict[str, Any]], second_starts: list[float]) -> dict[str, Any]:
    """The figures from the audit trail (epoch seconds, database clock): seconds after the join / the leave."""
    acquired = sorted(e["at"] for e in events if e["op"] == "acquire" and e["instance_id"] in second
                      and e["at"] >= joined_at)
    share = partitions // 2
    # Who holds each partition over time, to find when the first instance held all of them again.
    holder: dict[int, int | None] = {}
    back_at: float | None = None
    tokens: dict[int, list[int]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e["at"]):
        part = int(e["partition"])
        if e["op"] == "acquire":
            holder[part] = e["instance_id"]
            tokens[part].append(int(e["token"]))
        else:
            holder[part] = None
        if (left_at is not None and back_at is None and e["at"] >= left_at and len(holder) == partitions
                and all(h in first for h in holder.values())):
            back_at = e["at"]
    return {
        "first_partition_s": round(acquired[0] - joined_at, 3) if acquired else None,
        "first_task_s": round(min(second_starts) - joined_at, 3) if second_starts else None,
        "even_share_s": round(acquired[share - 1] - joined_at, 3) if len(acquired) >= share else None,
        "partitions_moved_to_joiner": len(acquired),
        "all_back_after_leave_s": round(back_at - left_at, 3) if back_at is not None and left_at else None,
        "tokens_increased": all(t == sorted(set(t)) for t in tokens.values()),
    }


def run_join(ctx: Ctx, plan: Plan, rep: int, tasks: list[PlannedTask]) -> dict[str, Any]:
    result: dict[str, Any] = {"repetition": rep + 1, "error": None}
    started = time.monotonic()
    bar = ctx.bar
    with run_database(ctx, result) as (dsn, conn):
        with conn.cursor() as cur:
            cur.execute(AUDIT_SQL)
        partitions = int(fetch_scalar(conn, "SELECT partitions FROM cluster_settings"))
        inserted = 0

        def top_up() -> None:
            nonlocal inserted
            waiting = fetch_scalar(conn, "SELECT count(*) FROM tasks WHERE state = 'queued' AND claimed_by IS NULL")
            if waiting < plan.takeover_low_water and inserted < len(tasks):
                chunk = tasks[inserted:inserted + plan.takeover_chunk]
                insert_tasks(conn, chunk)
                inserted += len(chunk)

        def wait_until(what: str, done: Any, runners: list[Any], limit: float) -> None:
            deadline = time.monotonic() + limit
            while not done():
                if time.monotonic() > deadline:
                    raise RunnerFailed(f"join {rep + 1}: {what} did not happen within {limit:.0f}s")
                check_running(runners)
                top_up()
                bar.set_postfix_str(f"join {rep + 1}: waiting until {what}")
                time.sleep(POLL)

        with instances(ctx, dsn, 1, True, f"join-first-r{rep + 1}") as (first_runner,):
            insert_tasks(conn, tasks[:plan.takeover_initial])
            inserted = plan.takeover_initial
            first = set(instance_ids_by_pid(conn).get(first_runner.pid, []))
            wait_until("the first instance holds every partition",
                       lambda: len(fetch_rows(conn, HELD_SQL)) == partitions, [first_runner], 60)
            busy_from = time.monotonic()
            wait_until("the first instance has run loaded for a while",
                       lambda: time.monotonic() - busy_from >= plan.hold_s, [first_runner], plan.hold_s + 30)
            with instances(ctx, dsn, 1, True, f"join-second-r{rep + 1}") as (second_runner,):
                second = set(instance_ids_by_pid(conn).get(second_runner.pid, []))
                joined_at = float(fetch_scalar(conn, "SELECT extract(epoch FROM min(started_at))::float8 "
                                                     "FROM instances WHERE id = ANY(%s)", (sorted(second),)))
                result["queued_at_join"] = int(fetch_scalar(conn, "SELECT count(*) FROM tasks WHERE state = 'queued'"))

                def second_holds_share() -> bool:
                    held = sum(1 for r in fetch_rows(conn, HELD_SQL) if int(r["instance_id"]) in second)
                    return held >= partitions // 2

                wait_until("the second instance holds its share", second_holds_share,
                           [first_runner, second_runner], 60)
                wait_until("the second instance has run a task",
                           lambda: bool(fetch_scalar(conn, "SELECT count(*) FROM tasks WHERE claimed_by = ANY(%s) "
                                                           "AND time_started IS NOT NULL", (sorted(second),))),
                           [first_runner, second_runner], 60)
                left_at = db_now(conn)
                result["second_exit_code"] = ctx.harness.stop(second_runner)
            wait_until("the first instance holds every partition again",
                       lambda: sum(1 for r in fetch_rows(conn, HELD_SQL) if int(r["instance_id"]) in first)
                       == partitions, [first_runner], 60)
            drain_limit = 120 + inserted * plan.takeover_sleep_ms / 1000.0
            deadline = time.monotonic() + drain_limit
            while unfinished(conn) and time.monotonic() < deadline:
                bar.set_postfix_str(f"join {rep + 1}: draining")
                time.sleep(POLL)
            left = unfinished(conn)
            if left:
                result["error"] = f"{left} tasks had not ended {drain_limit:.0f}s after the leave"
            result["first_exit_code"] = ctx.harness.stop(first_runner)
        events = fetch_rows(conn, """
            SELECT extract(epoch FROM at)::float8 AS at, op, partition, instance_id, token
            FROM bench_partition_events ORDER BY seq""")
        starts = [float(r["s"]) for r in fetch_rows(conn, """
            SELECT extract(epoch FROM time_started)::float8 AS s FROM tasks
            WHERE claimed_by = ANY(%s) AND time_started IS NOT NULL""", (sorted(second),))]
        result.update(join_figures(joined_at, left_at, first, second, partitions, events, starts))
        result["tasks_inserted"] = inserted
        result["ended_once"] = ended_once_verdict(fetch_rows(conn, ENDED_SQL)[0], inserted, set())
        result["order"] = measure.order_check(conn)
        result["partitions_held_after_stop"] = int(fetch_scalar(
            conn, "SELECT count(*) FROM partition_leases WHERE instance_id IS NOT NULL"))
        result["checks"] = {
            "ended_once": result["ended_once"]["ok"],
            "order": result["order"]["ok"],
            "tokens_increased": result["tokens_increased"],
            "joiner_got_its_share": result["even_share_s"] is not None,
            "all_back_after_leave": result["all_back_after_leave_s"] is not None,
            "clean_stops": result.get("second_exit_code") == 0 and result.get("first_exit_code") == 0,
            "no_partitions_held_after_stop": result["partitions_held_after_stop"] == 0,
        }
    result["ok"] = run_ok(result)
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result
