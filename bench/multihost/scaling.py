"""2. Scaling over instances: one no-op burst through a standalone instance and 1..3 multihost instances,
with each routing inside an instance (``--routing pinned`` and ``hash``), side by side in one run."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

from bench import measure
from bench.commit_probe import CommitProbe, chain_bound
from bench.harness import CpuWindow, check_running, fetch_rows, fetch_scalar, insert_tasks, log_lines, unfinished
from bench.multihost.suite import (
    ANOMALIES,
    ENDED_SQL,
    POLL,
    SHARDS,
    Ctx,
    Plan,
    ended_once_verdict,
    instance_ids_by_pid,
    instances,
    run_database,
    run_ok,
)
from bench.workloads import PlannedTask

# Pauses: from a moment when no task runs on any instance to the next start anywhere.
PAUSE_SQL = """
WITH o AS (
    SELECT time_started AS s,
           max(time_ended) OVER (ORDER BY time_started, id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev
    FROM tasks WHERE time_started IS NOT NULL AND time_ended IS NOT NULL
)
SELECT max(extract(epoch FROM s - prev))::float8 AS longest,
       count(*) FILTER (WHERE s - prev > interval '100 milliseconds') AS over_100ms
FROM o
"""

# The hottest key's chain: each link may start only once its predecessor has ended. gap: from a
# link's predecessor's end to its start (what a link costs beyond its own work); claimed_late: links
# that were claimed only after their predecessor had ended, so the chain waited for a claim.
HOT_CHAIN_SQL = """
WITH hot AS (
    SELECT key_type, key_id FROM tasks GROUP BY key_type, key_id ORDER BY count(*) DESC, key_id LIMIT 1
), chain AS (
    SELECT t.claimed_at, t.time_started, lag(t.time_ended) OVER (ORDER BY t.id) AS prev_ended
    FROM tasks t JOIN hot USING (key_type, key_id)
    WHERE t.time_started IS NOT NULL AND t.time_ended IS NOT NULL
)
SELECT count(*) + 1 AS links,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM time_started - prev_ended))::float8 AS gap_p50,
       avg(extract(epoch FROM time_started - prev_ended))::float8 AS gap_mean,
       count(*) FILTER (WHERE claimed_at > prev_ended) AS claimed_late
FROM chain WHERE prev_ended IS NOT NULL
"""


def hot_chain(conn: Any) -> dict[str, Any]:
    """The hottest key's links: the median and mean gap between a link's start and its predecessor's end
    (ms), and the share of links claimed only after their predecessor ended."""
    row = fetch_rows(conn, HOT_CHAIN_SQL)[0]
    links = int(row["links"] or 0)
    if links < 2:
        return {"links": links, "gap_p50_ms": None, "gap_mean_ms": None, "claimed_late_share": None}
    return {"links": links, "gap_p50_ms": round(row["gap_p50"] * 1000, 3),
            "gap_mean_ms": round(row["gap_mean"] * 1000, 3),
            "claimed_late_share": round(int(row["claimed_late"]) / (links - 1), 4)}


def database_transactions(conn: Any) -> int:
    """Commits + rollbacks in this database so far (pg_stat_database: backends report them when idle or
    at exit, so a figure taken while daemons run may lag by their last second)."""
    return int(fetch_scalar(conn, "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                             "WHERE datname = current_database()"))


def partition_acquisitions(conn: Any) -> int:
    """Partition leases handed out so far: every acquisition (first claim, hand-over, takeover) takes a
    token from one sequence, so its last value counts them."""
    row = fetch_rows(conn, "SELECT last_value, is_called FROM partition_lease_tokens")[0]
    return int(row["last_value"]) if row["is_called"] else 0


BALANCE_SQL = """
SELECT count(DISTINCT instance_id) AS holders, min(n) AS least, max(n) AS most,
       bool_or(releasing) AS releasing, bool_or(wanted_by IS NOT NULL) AS wanted,
       count(*) FILTER (WHERE instance_id IS NULL) AS free
FROM (SELECT pl.*, count(*) OVER (PARTITION BY instance_id) AS n FROM partition_leases pl) x
"""


def wait_balanced(conn: Any, count: int, deadline_s: float = 60.0) -> float | None:
    """Seconds until ``count`` live instances hold an even share of the partitions with no hand-over
    pending (each floor or ceil of P / count); None if not within ``deadline_s``. A fleet's instances are
    long-lived: the burst measures them balanced, not the balancing that follows their start."""
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        row = fetch_rows(conn, BALANCE_SQL)[0]
        if (row["holders"] == count and not row["free"] and not row["releasing"] and not row["wanted"]
                and row["most"] - row["least"] <= 1):
            return round(time.monotonic() - started, 3)
        time.sleep(POLL)
    return None


def load_balance(conn: Any, ids: list[list[int]], tasks: int, span_s: float | None) -> dict[str, Any]:
    """How evenly the run's tasks fell on its shards, and how long instances sat idle at the end.

    ``tasks_per_shard``: per shard of the setup, most first (a shard that ran nothing counts 0).
    ``busiest_shard_load``: the most tasks one shard ran over an even share of all the setup's shards
    (1.0 is even; hash routing sends a partition to a fixed shard whatever its load). ``idle_tail_share``:
    from the first instance's last end to the run's last end, as a share of the run's span (0 with one
    instance; an instance that ran nothing ends at the run's first start): time one instance had
    nothing left while another still worked, which tasks/s counts. Ids of no runner are left out.
    """
    rows = fetch_rows(conn, """
        SELECT claimed_by, run_by_shard, count(*) AS n, min(time_started) AS first_start, max(time_ended) AS last_end
        FROM tasks WHERE time_ended IS NOT NULL AND claimed_by IS NOT NULL GROUP BY claimed_by, run_by_shard""")
    instance_of = {instance_id: index for index, group in enumerate(ids) for instance_id in group}
    per_shard: dict[tuple[int, int], int] = defaultdict(int)
    last_end: dict[int, Any] = {}
    first_start = None
    for r in rows:
        instance = instance_of.get(int(r["claimed_by"]))
        if instance is None:
            continue
        per_shard[(instance, r["run_by_shard"] if r["run_by_shard"] is not None else -1)] += int(r["n"])
        if instance not in last_end or r["last_end"] > last_end[instance]:
            last_end[instance] = r["last_end"]
        if r["first_start"] is not None and (first_start is None or r["first_start"] < first_start):
            first_start = r["first_start"]
    counts = sorted(per_shard.values(), reverse=True)
    counts += [0] * (len(ids) * SHARDS - len(counts))
    even = tasks / (len(ids) * SHARDS)
    out: dict[str, Any] = {"tasks_per_shard": counts,
                           "busiest_shard_load": round(counts[0] / even, 3) if per_shard else None,
                           "idle_tail_share": None}
    if len(ids) == 1:
        out["idle_tail_share"] = 0.0
    elif last_end and span_s and first_start is not None:
        ends = [last_end.get(index, first_start) for index in range(len(ids))]
        out["idle_tail_share"] = round((max(ends) - min(ends)).total_seconds() / span_s, 3)
    return out


def setup_label(count: int, multihost: bool, routing: str) -> str:
    return f"{count} multihost, {routing}" if multihost else f"standalone, {routing}"


def run_scaling(ctx: Ctx, plan: Plan, count: int, multihost: bool, routing: str, rep: int,
                tasks: list[PlannedTask]) -> dict[str, Any]:
    label = setup_label(count, multihost, routing)
    result: dict[str, Any] = {"setup": label, "mode": "multihost" if multihost else "standalone",
                              "routing": routing, "instances": count, "shards_per_instance": SHARDS,
                              "repetition": rep + 1, "tasks": len(tasks), "error": None}
    started = time.monotonic()
    with run_database(ctx, result) as (dsn, conn):
        with instances(ctx, dsn, count, multihost, f"scale-{'mh' if multihost else 'sa'}{count}-{routing}-r{rep + 1}",
                       routing=routing) as runners:
            if multihost:
                result["balanced_after_s"] = wait_balanced(conn, count)
                if result["balanced_after_s"] is None:
                    result["error"] = f"the {count} instances did not balance the partitions within 60 s"
            probe = CommitProbe(dsn)  # its table is created before the transactions are counted
            xacts_before = database_transactions(conn)
            window = CpuWindow([r.pid for r in runners], ctx.harness.postmaster_pid)
            wall_start = time.monotonic()
            with probe:
                insert_tasks(conn, tasks)
                limit = 120 + len(tasks) / 50.0
                while True:
                    left = unfinished(conn)
                    ctx.bar.set_postfix_str(f"scaling {label}: {len(tasks) - left}/{len(tasks)} tasks ended")
                    if left == 0:
                        break
                    if time.monotonic() - wall_start > limit:
                        result["error"] = f"{left} tasks had not ended within {limit:.0f}s"
                        break
                    check_running(runners)
                    time.sleep(POLL)
            result["commit_probe"] = probe.figures
            usage = window.close()
            codes = [ctx.harness.stop(r) for r in runners]
            result["exit_codes"] = codes
            if any(c != 0 for c in codes) and result["error"] is None:
                result["error"] = f"an instance did not stop cleanly on SIGTERM (exit codes {codes})"
            result["log_notes"] = {f"instance {i + 1}": log_lines(r, ANOMALIES)[:30]
                                   for i, r in enumerate(runners)}
            per_pid = instance_ids_by_pid(conn)
            ids = [per_pid.get(r.pid, []) for r in runners]
        cpu, pg_cpu, total_cpu = usage.groups_s, usage.postgres_s, sum(usage.groups_s)
        result["wall_s"] = round(usage.wall_s, 3)
        result["cpu"] = {
            "taskomatic_s": round(total_cpu, 3), "taskomatic_s_per_instance": [round(c, 3) for c in cpu],
            "postgres_s": round(pg_cpu, 3), "bench_s": round(usage.bench_s, 3),
            "taskomatic_s_per_1k": round(total_cpu / len(tasks) * 1000, 4),
            "postgres_s_per_1k": round(pg_cpu / len(tasks) * 1000, 4),
            "machine_busy_s": round(usage.machine_busy_s, 3), "other_s": round(usage.other_s, 3),
            "other_share": usage.other_share,
        }
        span = fetch_rows(conn, """
            SELECT count(*) AS n, extract(epoch FROM max(time_ended) - min(time_started))::float8 AS span,
                   extract(epoch FROM max(time_ended) - min(created_at))::float8 AS makespan
            FROM tasks WHERE time_started IS NOT NULL AND time_ended IS NOT NULL""")[0]
        result["throughput_tps"] = round(span["n"] / span["span"], 1) if span["span"] else None
        pause = fetch_rows(conn, PAUSE_SQL)[0]
        # Every task was queued from the burst on, so a moment when no task runs anywhere is work waiting.
        result["pauses"] = {"longest_s": round(pause["longest"] or 0.0, 3),
                            "over_100ms": int(pause["over_100ms"] or 0)}
        result["hot_chain"] = hot_chain(conn)
        result["chain_bound"] = chain_bound(result["hot_chain"]["links"], result["commit_probe"]["p50_ms"],
                                            int(span["n"]), span["span"])
        time.sleep(0.5)  # the daemons' backends have exited; their statistics land
        # Less the probe's own commits (one per sample).
        xacts = database_transactions(conn) - xacts_before - result["commit_probe"]["samples"]
        result["db_transactions"] = xacts
        result["db_transactions_per_task"] = round(xacts / len(tasks), 2)
        result["makespan_s"] = round(span["makespan"], 3) if span["makespan"] is not None else None
        share = {int(r["claimed_by"]): int(r["n"]) for r in fetch_rows(
            conn, "SELECT claimed_by, count(*) AS n FROM tasks GROUP BY claimed_by") if r["claimed_by"]}
        per_instance = [sum(share.get(x, 0) for x in group) for group in ids]
        result["tasks_per_instance"] = per_instance
        result["share_per_instance"] = [round(c / len(tasks), 4) for c in per_instance]
        result.update(load_balance(conn, ids, len(tasks), span["span"]))
        if multihost:
            # Leases taken: P when the first instance starts, then one per partition that moves.
            result["partition_acquisitions"] = partition_acquisitions(conn)
            even = 1.0 / count
            result["share_spread"] = round(max(abs(s - even) / even for s in result["share_per_instance"]), 4)
        result["ended_once"] = ended_once_verdict(fetch_rows(conn, ENDED_SQL)[0], len(tasks), set())
        result["order"] = measure.order_check(conn)
        result["rejoined"] = sum(len(g) - 1 for g in ids if len(g) > 1)
        result["checks"] = {"ended_once": result["ended_once"]["ok"], "order": result["order"]["ok"],
                            "no_rejoin": result["rejoined"] == 0}
    result["ok"] = run_ok(result)
    result["run_wall_s"] = round(time.monotonic() - started, 1)
    return result


def paired_ratios(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each run's tasks/s and PostgreSQL CPU per task over those of the standalone run of the same routing
    and repetition (the same pass over the setups, so the machine's drift between passes cancels): the
    median and the range. Empty for a standalone setup, or when no repetition has both runs."""
    if not rows or rows[0]["mode"] == "standalone":
        return {}
    reference = {r["repetition"]: r for r in runs
                 if r["mode"] == "standalone" and r.get("routing") == rows[0].get("routing") and "repetition" in r}
    tps: list[float] = []
    pg: list[float] = []
    for r in rows:
        ref = reference.get(r.get("repetition"))
        if ref is None:
            continue
        if r.get("throughput_tps") and ref.get("throughput_tps"):
            tps.append(r["throughput_tps"] / ref["throughput_tps"])
        mine, theirs = (r.get("cpu") or {}).get("postgres_s_per_1k"), (ref.get("cpu") or {}).get("postgres_s_per_1k")
        if mine is not None and theirs:
            pg.append(mine / theirs)
    out: dict[str, Any] = {}
    if tps:
        out["paired_throughput_ratio"] = round(statistics.median(tps), 3)
        out["paired_throughput_ratio_range"] = [round(min(tps), 3), round(max(tps), 3)]
    if pg:
        out["paired_postgres_cpu_ratio"] = round(statistics.median(pg), 3)
        out["paired_postgres_cpu_ratio_range"] = [round(min(pg), 3), round(max(pg), 3)]
    return out


def scaling_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setup: the median of its repetitions; ratios to the standalone reference of the same routing."""
    setups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        setups[r["setup"]].append(r)

    def med(rows: list[dict[str, Any]], get: Any) -> float | None:
        values = [v for v in (get(r) for r in rows) if v is not None]
        return round(statistics.median(values), 4) if values else None

    out = []
    for setup, rows in setups.items():
        shares = [r["share_per_instance"] for r in rows if r.get("share_per_instance")]
        out.append({
            "setup": setup, "mode": rows[0]["mode"], "routing": rows[0].get("routing"),
            "instances": rows[0]["instances"], "runs": len(rows),
            "ok": all(r["ok"] for r in rows),
            "throughput_tps": med(rows, lambda r: r.get("throughput_tps")),
            "throughput_tps_all": [r.get("throughput_tps") for r in rows],
            "taskomatic_cpu_s_per_1k": med(rows, lambda r: (r.get("cpu") or {}).get("taskomatic_s_per_1k")),
            "postgres_cpu_s_per_1k": med(rows, lambda r: (r.get("cpu") or {}).get("postgres_s_per_1k")),
            "partition_acquisitions": med(rows, lambda r: r.get("partition_acquisitions")),
            "share_spread": med(rows, lambda r: r.get("share_spread")),
            "busiest_shard_load": med(rows, lambda r: r.get("busiest_shard_load")),
            "idle_tail_share": med(rows, lambda r: r.get("idle_tail_share")),
            "db_transactions_per_task": med(rows, lambda r: r.get("db_transactions_per_task")),
            "longest_pause_s": med(rows, lambda r: (r.get("pauses") or {}).get("longest_s")),
            "hot_chain_gap_p50_ms": med(rows, lambda r: (r.get("hot_chain") or {}).get("gap_p50_ms")),
            "hot_chain_claimed_late_share": med(rows, lambda r: (r.get("hot_chain") or {}).get("claimed_late_share")),
            "commit_p50_ms": med(rows, lambda r: (r.get("commit_probe") or {}).get("p50_ms")),
            "chain_bound_tps": med(rows, lambda r: (r.get("chain_bound") or {}).get("bound_tps")),
            "chain_bound_share": med(rows, lambda r: (r.get("chain_bound") or {}).get("share_of_bound")),
            "other_share_max": max(((r.get("cpu") or {}).get("other_share") or 0.0) for r in rows),
            "share_per_instance": shares[len(shares) // 2] if shares else None,
        })
    for s in out:
        s.update(paired_ratios(setups[s["setup"]], runs))
    for s in out:
        reference = next((r for r in out if r["mode"] == "standalone" and r.get("routing") == s.get("routing")), None)
        ref = reference["throughput_tps"] if reference else None
        s["throughput_vs_standalone"] = round(s["throughput_tps"] / ref, 3) if ref and s["throughput_tps"] else None
        ref_pg = reference["postgres_cpu_s_per_1k"] if reference else None
        pg = s["postgres_cpu_s_per_1k"]
        s["postgres_cpu_vs_standalone"] = round(pg / ref_pg, 3) if ref_pg and pg is not None else None
    return out


