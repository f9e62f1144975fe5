"""1. Takeover after kill -9: how long until other instances hold the killed one's partitions and run their tasks."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from typing import Any

from bench import measure
from bench.harness import check_running, fetch_rows, fetch_scalar, insert_tasks, log_lines, unfinished
from bench.multihost.suite import (
    ANOMALIES,
    ENDED_SQL,
    POLL,
    Ctx,
    Plan,
    db_now,
    ended_once_verdict,
    instance_ids_by_pid,
    instances,
    kill_group,
    resolved_settings,
    run_database,
    run_ok,
    wait_group_gone,
)
from bench.runners import RunnerFailed
from bench.workloads import PlannedTask


def takeover_figures(t0: float, victim_ids: set[int], partitions: dict[int, int], events: list[dict[str, Any]],
                     starts: list[dict[str, Any]]) -> dict[str, Any]:
    """The takeover figures from the audit trail of ``partition_leases`` and the tasks of the victim's partitions.

    ``partitions``: the victim's partitions at the kill, with its token. ``events``: rows
    {at, op (acquire/release), partition, instance_id, previous, token, txid}, times as epoch seconds
    on the database clock. ``starts``: {partition, claimed_by, started} of every task of those
    partitions that started after ``t0``. Seconds are from ``t0``.
    """
    moved: dict[int, dict[str, Any]] = {}
    for e in sorted(events, key=lambda e: e["at"]):
        part = int(e["partition"])
        if part not in partitions or part in moved or e["at"] < t0:
            continue
        if e["op"] == "acquire" and e["instance_id"] not in victim_ids:
            moved[part] = e
    first_start: dict[int, float] = {}
    early: list[dict[str, Any]] = []  # started elsewhere before the partition had moved: a fencing failure
    for s in starts:
        part = int(s["partition"])
        if s["claimed_by"] in victim_ids or s["started"] < t0:
            continue
        if part not in moved or s["started"] < moved[part]["at"]:
            early.append({"partition": part, "started_s": round(s["started"] - t0, 3), "claimed_by": s["claimed_by"]})
        first_start[part] = min(first_start.get(part, s["started"]), s["started"])
    return {
        "partitions_at_kill": len(partitions),
        "partitions_moved": len(moved),
        "first_partition_s": round(min(e["at"] for e in moved.values()) - t0, 3) if moved else None,
        "all_partitions_s": round(max(e["at"] for e in moved.values()) - t0, 3)
        if len(moved) == len(partitions) and partitions else None,
        "first_task_s": round(min(first_start.values()) - t0, 3) if first_start else None,
        "moved_to": {str(k): v for k, v in sorted(Counter(e["instance_id"] for e in moved.values()).items())},
        "takeover_transactions": len({(e["instance_id"], e["txid"]) for e in moved.values()}),
        "tokens_increased": all(e["token"] > partitions[p] for p, e in moved.items()),
        "started_before_partition_moved": early,
        "per_partition": [{"partition": p, "moved_s": round(e["at"] - t0, 3), "to_instance_id": e["instance_id"],
                           "old_token": partitions[p], "new_token": e["token"],
                           "first_task_s": round(first_start[p] - t0, 3) if p in first_start else None}
                          for p, e in sorted(moved.items(), key=lambda kv: kv[1]["at"])],
    }


# One row per change of a partition's holder, stamped in the transaction that made it.
AUDIT_SQL = """
CREATE UNLOGGED TABLE bench_partition_events (
    seq         bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    txid        bigint NOT NULL DEFAULT txid_current(),
    op          text NOT NULL,
    partition   smallint NOT NULL,
    instance_id bigint,
    previous    bigint,
    token       bigint
);
CREATE FUNCTION bench_partition_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.instance_id IS NOT NULL AND NEW.token IS DISTINCT FROM OLD.token THEN
        INSERT INTO bench_partition_events (op, partition, instance_id, previous, token)
        VALUES ('acquire', NEW.partition, NEW.instance_id, OLD.instance_id, NEW.token);
    ELSIF NEW.instance_id IS NULL AND OLD.instance_id IS NOT NULL THEN
        INSERT INTO bench_partition_events (op, partition, previous, token)
        VALUES ('release', NEW.partition, OLD.instance_id, OLD.token);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER bench_partition_events AFTER UPDATE ON partition_leases
FOR EACH ROW EXECUTE FUNCTION bench_partition_event();
"""

HELD_SQL = "SELECT partition, instance_id, token FROM partition_leases WHERE instance_id IS NOT NULL"


def kill_jitter(seed: int, rep: int, renew_interval: float) -> float:
    """Extra wait before the kill, uniform over one renewal interval (seeded): the kill lands at a random
    point of the victim's renewal cycle, not at the same phase in every repetition."""
    return random.Random(f"taskomatic-bench-multihost:{seed}:{rep}").uniform(0.0, renew_interval)


def start_stagger(seed: int, rep: int, count: int, renew_interval: float) -> list[float]:
    """Waits before starting each instance: the first at once, each other one after a random part of a
    renewal interval (seeded). An instance renews its lease and looks for partitions to take over on timers
    that start with it; started together, every survivor's takeover check would fall at about the same
    point of the victim's renewal cycle in every repetition, as it would not across real machines."""
    rng = random.Random(f"taskomatic-bench-multihost-start:{seed}:{rep}")
    return [0.0] + [rng.uniform(0.0, renew_interval) for _ in range(count - 1)]


def run_takeover(ctx: Ctx, plan: Plan, rep: int, tasks: list[PlannedTask], seed: int) -> dict[str, Any]:
    n = plan.takeover_instances
    victim_index = rep % n
    renew = float(resolved_settings(ctx.overrides)["lease_renew_interval"])
    jitter = kill_jitter(seed, rep, renew)
    stagger = start_stagger(seed, rep, n, renew)
    result: dict[str, Any] = {"repetition": rep + 1, "instances": n, "victim": victim_index + 1, "error": None,
                              "kill_jitter_s": round(jitter, 3), "start_stagger_s": [round(x, 3) for x in stagger]}
    started = time.monotonic()
    bar = ctx.bar
    with run_database(ctx, result) as (dsn, conn):
        with conn.cursor() as cur:
            cur.execute(AUDIT_SQL)
        with instances(ctx, dsn, n, True, f"takeover-r{rep + 1}", stagger) as runners:
            pids = instance_ids_by_pid(conn)
            ids = {i: set(pids.get(r.pid, [])) for i, r in enumerate(runners)}
            # The bench's numbering (start order) is not the daemon's instance ids (registration order).
            result["instance_ids"] = {f"instance {i + 1}": sorted(v) for i, v in ids.items()}
            victim = runners[victim_index]
            inserted = 0

            def top_up() -> None:
                nonlocal inserted
                waiting = fetch_scalar(conn, "SELECT count(*) FROM tasks WHERE state = 'queued' "
                                        "AND claimed_by IS NULL")
                if waiting < plan.takeover_low_water and inserted < len(tasks):
                    chunk = tasks[inserted:inserted + plan.takeover_chunk]
                    insert_tasks(conn, chunk)
                    inserted += len(chunk)

            insert_tasks(conn, tasks[:plan.takeover_initial])
            inserted = plan.takeover_initial
            burst_at = time.monotonic()
            # Wait until every instance has held partitions for hold_s + jitter (and the victim holds some now).
            hold = plan.hold_s + jitter
            first_held: dict[int, float] = {}
            deadline = time.monotonic() + 60 + hold
            while True:
                now = time.monotonic()
                held = Counter(int(r["instance_id"]) for r in fetch_rows(conn, HELD_SQL))
                for i in range(n):
                    if any(held.get(x) for x in ids[i]):
                        first_held.setdefault(i, now)
                victim_holds = sum(held.get(x, 0) for x in ids[victim_index])
                if (len(first_held) == n and victim_holds > 0
                        and min(now - t for t in first_held.values()) >= hold):
                    break
                if now > deadline:
                    raise RunnerFailed(f"not every instance held partitions for {hold:.1f}s within "
                                       f"{deadline - burst_at:.0f}s (holding: {dict(held)})")
                check_running(runners)
                top_up()
                bar.set_postfix_str(f"takeover {rep + 1}: instances holding partitions {len(first_held)}/{n}")
                time.sleep(POLL)
            result["kill_after_burst_s"] = round(time.monotonic() - burst_at, 3)
            held_before = {int(r["partition"]): int(r["token"]) for r in fetch_rows(conn, HELD_SQL)
                           if int(r["instance_id"]) in ids[victim_index]}
            kill_group(victim)
            t0 = db_now(conn)
            killed_at = time.monotonic()
            busy_at_kill = measure.machine_busy_seconds()
            result["victim_processes_gone"] = wait_group_gone(victim)
            if result["victim_processes_gone"]:
                ctx.harness.forget_killed(victim)
            time.sleep(max(0.0, 0.3 - (time.monotonic() - killed_at)))  # a commit in flight lands
            victim_ids = ids[victim_index]
            parts = {int(r["partition"]): int(r["token"]) for r in fetch_rows(conn, HELD_SQL)
                     if int(r["instance_id"]) in victim_ids}
            lease = fetch_rows(conn, "SELECT extract(epoch FROM max(lease_expires_at))::float8 AS expires "
                                "FROM instances WHERE id = ANY(%s)", (sorted(victim_ids),))[0]["expires"]
            in_flight = fetch_rows(conn, "SELECT id, state FROM tasks WHERE claimed_by = ANY(%s) "
                                    "AND state IN ('queued', 'running')", (sorted(victim_ids),))
            in_flight_ids = {int(r["id"]) for r in in_flight if r["state"] == "running"}
            unended_at_kill = {int(r["partition"]): int(r["n"]) for r in fetch_rows(conn, """
                SELECT partition, count(*) AS n FROM tasks
                WHERE state IN ('queued', 'running') AND partition = ANY(%s::smallint[])
                GROUP BY partition""", (sorted(parts),))}
            if not parts:
                result["error"] = "the killed instance held no partitions at the kill (released between the " \
                                  "snapshot and the kill)"
            result.update({
                "victim_instance_ids": sorted(victim_ids),
                "partitions_before_kill": len(held_before), "partitions_at_kill": len(parts),
                "partitions_changed_between_snapshot_and_kill": sorted(set(parts) ^ set(held_before)),
                "victim_lease_left_at_kill_s": round(lease - t0, 3) if lease is not None else None,
                "victim_tasks_running_at_kill": len(in_flight_ids),
                "victim_tasks_claimed_queued_at_kill": sum(r["state"] == "queued" for r in in_flight),
            })
            # Wait until every one of its partitions is held by another instance.
            limit = 3 * _lease_seconds(ctx) + 30
            moved = 0
            while True:
                moved = int(fetch_scalar(conn, """
                    SELECT count(DISTINCT partition) FROM bench_partition_events
                    WHERE op = 'acquire' AND at >= to_timestamp(%s) AND NOT (instance_id = ANY(%s))
                      AND partition = ANY(%s::smallint[])""", (t0, sorted(victim_ids), sorted(parts))))
                elapsed = time.monotonic() - killed_at
                bar.set_postfix_str(f"takeover {rep + 1}: t0+{elapsed:.1f}s, {moved}/{len(parts)} partitions moved")
                if moved >= len(parts):
                    break
                if elapsed > limit:
                    result["error"] = f"only {moved} of {len(parts)} partitions moved within {limit:.0f}s of the kill"
                    break
                check_running(runners, "surviving instance", skip=victim_index)
                top_up()
                time.sleep(POLL)
            window = time.monotonic() - killed_at
            # Everything the machine did meanwhile (the daemons, PostgreSQL, the bench and anything else).
            result["machine_busy_share_until_moved"] = round(
                (measure.machine_busy_seconds() - busy_at_kill) / (window * (os.cpu_count() or 1)), 3)
            result["tasks_inserted"] = inserted
            # Drain: wait until every task has ended (the survivors only now).
            drain_limit = 120 + inserted * plan.takeover_sleep_ms / 1000.0
            drain_start = time.monotonic()
            while True:
                left = unfinished(conn)
                bar.set_postfix_str(f"takeover {rep + 1}: draining, {left} tasks left")
                if left == 0:
                    break
                if time.monotonic() - drain_start > drain_limit:
                    result["error"] = result["error"] or f"{left} tasks had not ended {drain_limit:.0f}s " \
                                                         "after the partitions moved"
                    break
                time.sleep(POLL)
            codes = [ctx.harness.stop(r) for i, r in enumerate(runners) if i != victim_index]
            result["survivor_exit_codes"] = codes
            if any(c != 0 for c in codes) and result["error"] is None:
                result["error"] = f"a surviving instance did not stop cleanly on SIGTERM (exit codes {codes})"
            result["log_notes"] = {f"instance {i + 1}": log_lines(r, ("took over", *ANOMALIES))[:30]
                                   for i, r in enumerate(runners)}
        # Everything from the database, now final.
        events = fetch_rows(conn, """
            SELECT extract(epoch FROM at)::float8 AS at, txid, op, partition, instance_id, previous, token
            FROM bench_partition_events ORDER BY seq""")
        starts = fetch_rows(conn, """
            SELECT partition, claimed_by, extract(epoch FROM time_started)::float8 AS started
            FROM tasks WHERE partition = ANY(%s::smallint[]) AND time_started >= to_timestamp(%s)""",
                            (sorted(parts), t0))
        figures = takeover_figures(t0, victim_ids, parts, events, starts)
        for row in figures["per_partition"]:  # unended tasks of the partition at the kill
            row["tasks_left_at_kill"] = unended_at_kill.get(row["partition"], 0)
        result.update(figures)
        settled = fetch_rows(conn, "SELECT extract(epoch FROM max(time_ended))::float8 AS ended, "
                              "count(*) FILTER (WHERE attempts > 1) AS rerun FROM tasks WHERE id = ANY(%s)",
                        (sorted(in_flight_ids),))[0]
        result["in_flight_settled_s"] = (round(settled["ended"] - t0, 3) if settled["ended"] is not None
                                         else None)
        result["ended_once"] = ended_once_verdict(fetch_rows(conn, ENDED_SQL)[0], result["tasks_inserted"],
                                                  in_flight_ids)
        result["order"] = measure.order_check(conn)
        # Every survivor stopped gracefully: it released what it held; the victim's went to the survivors.
        result["partitions_held_after_stop"] = int(fetch_scalar(
            conn, "SELECT count(*) FROM partition_leases WHERE instance_id IS NOT NULL"))
        per_pid = instance_ids_by_pid(conn)
        result["rejoined"] = {f"instance {i + 1}": len(per_pid.get(r.pid, [])) - 1 for i, r in enumerate(runners)
                              if len(per_pid.get(r.pid, [])) > 1}
        share = {int(r["claimed_by"]): int(r["n"]) for r in fetch_rows(
            conn, "SELECT claimed_by, count(*) AS n FROM tasks GROUP BY claimed_by") if r["claimed_by"]}
        result["tasks_by_instance"] = {f"instance {i + 1}": sum(share.get(x, 0) for x in per_pid.get(r.pid, []))
                                       for i, r in enumerate(runners)}
        result["moved_to"] = {f"instance {i + 1}": sum(figures["moved_to"].get(str(x), 0)
                                                      for x in per_pid.get(r.pid, []))
                              for i, r in enumerate(runners) if i != victim_index}
        result["checks"] = {
            "ended_once": result["ended_once"]["ok"],
            "order": result["order"]["ok"],
            "all_partitions_moved": figures["partitions_moved"] == figures["partitions_at_kill"],
            "no_start_before_partition_moved": not figures["started_before_partition_moved"],
            "tokens_increased": figures["tokens_increased"],
            "no_partitions_held_after_stop": result["partitions_held_after_stop"] == 0,
            "no_rejoin": not result["rejoined"],
        }
    result["ok"] = run_ok(result)
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def _lease_seconds(ctx: Ctx) -> float:
    """The lease the instances run with (the default or ``--set``)."""
    return float(resolved_settings(ctx.overrides)["lease_seconds"])


