"""Does a task cost more when the table holds history? ``python -m bench.history`` (issue 17).

The same burst (``--tasks`` no-op tasks over ``--keys`` VM ids, default the
issue's 20,000 over 500) through the real daemon (``--shards``, default 4),
once on an empty tasks table and once per ``--rows`` size (default 1,000,000
finished rows already in the table, as a long-lived fleet's table holds; add
10,000,000 with ``--rows 1000000 --rows 10000000``), in the same run, each
``--repeats`` times, alternating, so drift of the machine hits all alike.

Each run: a fresh database copied from the migrated template
(``bench.harness``); the history inserted in one ``INSERT ... SELECT FROM
generate_series`` through the table's triggers (``finished``, claimed by a
stopped instance, over ``--history-keys`` other VM ids, or the burst's own
with ``--shared-keys``, ended over the 5 days from 6 days ago: inside the
default retention, [retention] keep_finished = 7d, so the daemon keeps them), then ``VACUUM ANALYZE tasks``
(what autovacuum will have done to a long-lived table) and a CHECKPOINT; then
the daemon starts (``bench.runners.Runner``: the bench plugin's ``noop``, an
empty configuration, ``--set`` overrides), and once it is ready the burst is
queued in one INSERT and the bench waits until every task has ended.

Figures, over the burst's tasks only (ids above the history): tasks/s (tasks /
(last end - first start)), CPU seconds per 1,000 tasks of the daemon's process
group and of PostgreSQL, the daemon's CPU per task by process
(``bench.process_cpu``), per-key order (SQL), the updates of ``tasks`` and how
many were HOT (``pg_stat_user_tables``), the size of the table and of each of
its indexes before and after, and the share of the machine other processes
used. The ratio of each history size's median tasks/s to the empty table's is
the figure the issue targets (>= 0.90). Output: a summary, and
``bench/results/<stamp>-history/history.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench.harness import (
    RESULTS_DIR,
    CpuWindow,
    Harness,
    check_overrides,
    daemon_config,
    fetch_rows,
    fetch_scalar,
    insert_tasks,
)
from bench.process_cpu import daemon_roles, per_task, snapshot
from bench.runners import Runner, RunnerFailed, RunnerSpec
from bench.workloads import Workload, generate

# state IN ('queued', 'running') as the two partial indexes hold it (migration 0010), first one only.
UNFINISHED_SQL = """
SELECT EXISTS (SELECT 1 FROM tasks WHERE state = 'queued' AND claimed_by IS NULL)
    OR EXISTS (SELECT 1 FROM tasks WHERE claimed_by IS NOT NULL AND state IN ('queued', 'running'))
"""
POLL_SECONDS = 0.2  # between looks for unfinished tasks (as bench.run)

HISTORY_SQL = """
INSERT INTO tasks (task_target_type, task_target_id, action, args, state, submitted_by,
                   created_at, time_started, time_ended, claimed_by, claimed_at, attempts)
SELECT 'Vm', %(first_key)s + (g %% %(keys)s), 'noop', '{}'::jsonb, 'finished', 'bench history',
       t, t, t + interval '1 millisecond', %(instance_id)s, t, 1
FROM generate_series(1, %(rows)s) AS g,
     LATERAL (SELECT clock_timestamp() - interval '6 days'
                     + make_interval(secs => g * 432000.0 / %(rows)s)) AS s(t)
"""

STOPPED_INSTANCE_SQL = """
INSERT INTO instances (hostname, pid, version, mode, shards, stopped_at)
VALUES ('bench-history', 1, 'bench', 'standalone', 1, clock_timestamp()) RETURNING id
"""

SIZES_SQL = """
SELECT c.relname AS name, pg_relation_size(c.oid) AS bytes
FROM pg_class c
WHERE c.oid = 'tasks'::regclass
   OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'tasks'::regclass)
ORDER BY c.relname
"""

UPDATES_SQL = """
SELECT n_tup_upd AS updates, n_tup_hot_upd AS hot_updates, n_tup_ins AS inserts,
       autovacuum_count + vacuum_count AS vacuums, autoanalyze_count + analyze_count AS analyzes
FROM pg_stat_user_tables WHERE relid = 'tasks'::regclass
"""

BURST_FIGURES_SQL = """
SELECT count(*) AS total,
       count(*) FILTER (WHERE state = 'finished') AS finished,
       extract(epoch FROM min(time_started))::float8 AS first_start,
       extract(epoch FROM max(time_ended))::float8 AS last_end,
       extract(epoch FROM min(created_at))::float8 AS first_created
FROM tasks WHERE id > %(after)s
"""

BURST_ORDER_SQL = """
WITH ordered AS (
    SELECT time_started, lag(time_ended) OVER (PARTITION BY key_type, key_id ORDER BY id) AS previous_end
    FROM tasks WHERE id > %(after)s
)
SELECT count(*) FILTER (WHERE previous_end IS NULL AND time_started IS NULL) AS never_started,
       count(*) FILTER (WHERE previous_end > time_started) AS violations
FROM ordered
"""


STATEMENTS_SQL = """
SELECT calls, round(total_exec_time::numeric, 1)::float8 AS total_ms, rows,
       shared_blks_hit AS hit, shared_blks_read AS read, shared_blks_dirtied AS dirtied,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time DESC LIMIT 8
"""


def enable_statements(harness: Harness) -> None:
    """Load pg_stat_statements into the private server (a restart) for --statements."""
    assert harness.pg is not None, "--statements needs the private PostgreSQL"
    conn = psycopg2.connect(harness.server_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    conn.close()
    harness.pg.restart()


def reset_statements(conn: Any) -> None:
    """Start pg_stat_statements' counts afresh (creating the extension in this database if needed)."""
    with conn.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        cur.execute("SELECT pg_stat_statements_reset()")
    conn.commit()


def _statements(conn: Any, reset: bool) -> list[dict[str, Any]]:
    """The busiest statements of this database since the last reset (and reset them)."""
    with conn.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    conn.commit()
    rows = [] if reset else fetch_rows(conn, STATEMENTS_SQL)
    reset_statements(conn)
    return rows


def wait_all_ended(conn: Any, runner: Runner, timeout_s: float, poll_s: float = POLL_SECONDS) -> None:
    """Until no task is queued or running; RunnerFailed if the daemon exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while any_unfinished(conn):
        if runner.process.poll() is not None:
            raise RunnerFailed(f"the daemon exited with {runner.process.returncode} mid-run:\n{runner.log_tail()}")
        if time.monotonic() > deadline:
            raise RunnerFailed(f"not every task ended within {timeout_s:.0f} s")
        time.sleep(poll_s)


def any_unfinished(conn: Any) -> bool:
    """Is a task queued or running? (Stops at the first: a count would visit every row of the burst.)"""
    found = bool(fetch_scalar(conn, UNFINISHED_SQL))
    conn.rollback()
    return found


def _sizes(conn: Any) -> dict[str, float]:
    """MB of the tasks table and of each of its indexes."""
    rows = fetch_rows(conn, SIZES_SQL)
    conn.rollback()
    return {r["name"]: round(r["bytes"] / 2**20, 2) for r in rows}


def _stats(conn: Any) -> dict[str, int]:
    # Statistics are sent by the backends at transaction end; make sure ours are fresh.
    with conn.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
    row = fetch_rows(conn, UPDATES_SQL)[0]
    conn.rollback()
    return {k: int(v) for k, v in row.items()}


def add_history(conn: Any, rows: int, first_key: int, keys: int) -> dict[str, Any]:
    """``rows`` finished tasks, then VACUUM ANALYZE and a CHECKPOINT: timings."""
    out: dict[str, Any] = {"rows": rows, "first_key": first_key, "keys": keys}
    with conn.cursor() as cur:
        cur.execute(STOPPED_INSTANCE_SQL)
        instance_id = cur.fetchone()[0]
        start = time.monotonic()
        if rows:
            cur.execute(HISTORY_SQL, {"rows": rows, "first_key": first_key, "keys": keys,
                                      "instance_id": instance_id})
        conn.commit()
        out["insert_s"] = round(time.monotonic() - start, 2)
        conn.autocommit = True
        start = time.monotonic()
        cur.execute("VACUUM ANALYZE tasks")
        out["vacuum_analyze_s"] = round(time.monotonic() - start, 2)
        cur.execute("CHECKPOINT")
        conn.autocommit = False
    out["last_history_id"] = int(fetch_scalar(conn, "SELECT coalesce(max(id), 0) FROM tasks"))
    conn.rollback()
    return out


def burst_figures(conn: Any, after: int, tasks: int) -> dict[str, Any]:
    row = fetch_rows(conn, BURST_FIGURES_SQL, {"after": after})[0]
    order = fetch_rows(conn, BURST_ORDER_SQL, {"after": after})[0]
    conn.rollback()
    span = (row["last_end"] - row["first_start"]) if row["finished"] else None
    return {
        "tasks": int(row["total"]), "finished": int(row["finished"]), "expected": tasks,
        "span_s": round(span, 4) if span else None,
        "throughput_tps": round(row["finished"] / span, 1) if span else None,
        "makespan_s": round(row["last_end"] - row["first_created"], 4) if row["finished"] else None,
        "order_violations": int(order["violations"]),
    }


def one_run(harness: Harness, args: argparse.Namespace, history_rows: int, index: int) -> dict[str, Any]:
    """One case: a fresh database, its history, the daemon, the burst; every figure."""
    workload = Workload("noop-uniform", args.tasks, args.keys)
    planned = generate(workload, args.seed)
    first_key = 1 if args.shared_keys else args.keys + 1
    result: dict[str, Any] = {"history_rows": history_rows, "complete": False, "error": None}
    spec = RunnerSpec("taskomatic", args.shards)
    with harness.fresh_database() as dsn:
        conn = psycopg2.connect(dsn, application_name="bench history")
        try:
            result["history"] = add_history(conn, history_rows, first_key, args.history_keys)
            after = result["history"]["last_history_id"]
            result["sizes_before_mb"] = _sizes(conn)
            runner = harness.start(spec, dsn, harness.base / f"run{index:02d}-{history_rows}", args.set or [])
            try:
                result["ready_s"] = round(runner.wait_ready(), 3)
                before = _stats(conn)
                if args.statements:
                    _statements(conn, reset=True)
                roles = daemon_roles(runner.pid)
                counters = snapshot(roles)
                window = CpuWindow([runner.pid], harness.local_postmaster_pid)
                insert_tasks(conn, planned)
                wait_all_ended(conn, runner, args.run_timeout)
                cpu = window.close()
                # Which of the daemon's processes spent it (a table's size should cost only PostgreSQL).
                result["processes"] = per_task(roles, counters, snapshot(roles), args.tasks)
            except RunnerFailed as exc:
                result["error"] = str(exc)
                return result
            finally:
                result["exit_code"] = harness.stop(runner)
            after_stats = _stats(conn)  # the daemon's backends have exited: their statistics are in
            if args.statements:
                result["statements"] = _statements(conn, reset=False)
            result["cpu"] = {
                "daemon_s_per_1k": round(cpu.groups_s[0] / args.tasks * 1000, 4),
                "postgres_s_per_1k": round(cpu.postgres_s / args.tasks * 1000, 4),
                "other_share": cpu.other_share,
            }
            updates = after_stats["updates"] - before["updates"]
            hot = after_stats["hot_updates"] - before["hot_updates"]
            result["updates"] = {"updates": updates, "hot": hot,
                                 "hot_share": round(hot / updates, 4) if updates else None,
                                 "autovacuums_or_vacuums": after_stats["vacuums"] - before["vacuums"],
                                 "analyzes": after_stats["analyzes"] - before["analyzes"]}
            result["sizes_after_mb"] = _sizes(conn)
            result.update(burst_figures(conn, after, args.tasks))
            result["complete"] = (result["finished"] == args.tasks and result["order_violations"] == 0
                                  and result["exit_code"] == 0)
        finally:
            conn.close()
    return result


def summarise(runs: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """Median tasks/s per history size and its ratio to the empty table's."""
    by_size: dict[int, list[float]] = {size: [] for size in [0, *sizes]}
    for run in runs:
        if run["complete"] and run.get("throughput_tps"):
            by_size[run["history_rows"]].append(run["throughput_tps"])
    medians = {size: (statistics.median(v) if v else None) for size, v in by_size.items()}
    empty = medians[0]
    out = {}
    for size, median in medians.items():
        ratio = round(median / empty, 4) if empty and median else None
        out[str(size)] = {"median_tps": median, "runs_tps": by_size[size], "ratio_to_empty": ratio,
                          "target_met": ratio is not None and ratio >= 0.90}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = sorted(set(args.rows))
    started = datetime.now(UTC)
    wall = time.monotonic()
    runs: list[dict[str, Any]] = []
    with Harness("taskomatic-history-", args.keep_work_dir, announce="bench work directory") as harness:
        if args.statements:
            enable_statements(harness)
        index = 0
        for repeat in range(args.repeats):
            # Alternate the order, so neither case gains from the machine's drift.
            order = [0, *sizes] if repeat % 2 == 0 else [*sizes, 0]
            for rows in order:
                index += 1
                print(f"run {index}: {rows:,} history rows ...", file=sys.stderr, flush=True)
                result = one_run(harness, args, rows, index)
                result["repeat"] = repeat
                runs.append(result)
                print("  " + one_line(result), file=sys.stderr, flush=True)
        machine = harness.machine
    return {
        "benchmark": "history",
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - wall, 1),
        "command": " ".join(sys.argv),
        "machine": machine,
        "settings": {"tasks": args.tasks, "keys": args.keys, "shards": args.shards, "rows": sizes,
                     "history_keys": args.history_keys, "shared_keys": args.shared_keys,
                     "repeats": args.repeats, "seed": args.seed, "daemon": daemon_config(args.set or [])},
        "runs": runs,
        "summary": summarise(runs, sizes),
        "target": "every history size within 10 % of the empty table (ratio >= 0.90)",
    }


def one_line(run: dict[str, Any]) -> str:
    if run["error"]:
        return f"FAILED: {run['error'].splitlines()[0]}"
    upd = run["updates"]
    by_kind: dict[str, float] = {}
    for process in run.get("processes", []):
        kind = "shards" if process["role"].startswith("shard ") else process["role"]
        by_kind[kind] = by_kind.get(kind, 0.0) + process["on_cpu_ms_per_task"]
    split = ", ".join(f"{kind} {ms:.3f}" for kind, ms in sorted(by_kind.items()) if ms > 0)
    return (f"{run['throughput_tps']:,.0f} tasks/s, daemon {run['cpu']['daemon_s_per_1k']:.3f} s/1k "
            f"(on a CPU, ms/task: {split}), "
            f"PostgreSQL {run['cpu']['postgres_s_per_1k']:.3f} s/1k, HOT {upd['hot']:,}/{upd['updates']:,}, "
            f"other load {run['cpu']['other_share']:.0%}, order violations {run['order_violations']}")


def summary_text(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [f"{s['tasks']:,} no-op tasks over {s['keys']} keys, {s['shards']} shards, burst; "
             f"history over {'the same' if s['shared_keys'] else str(s['history_keys']) + ' other'} keys:"]
    for run in results["runs"]:
        lines.append(f"  {run['history_rows']:>11,} rows: {one_line(run)}")
        for st in run.get("statements", []):
            lines.append(f"      {st['total_ms']:>9.1f} ms {st['calls']:>6} calls {st['hit']:>8} hit "
                         f"{st['read']:>6} read {st['dirtied']:>6} dirtied  {st['query']}")
    for size, figures in results["summary"].items():
        if int(size) == 0:
            continue
        ratio = figures["ratio_to_empty"]
        lines.append(f"  {int(size):,} rows / empty: median {figures['median_tps'] or 0:,.0f} vs "
                     f"{results['summary']['0']['median_tps'] or 0:,.0f} tasks/s = "
                     + (f"{ratio:.3f} ({'meets' if figures['target_met'] else 'misses'} the target)"
                        if ratio is not None else "n/a"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, action="append",
                        help="finished rows already in the table (repeatable; default 1,000,000)")
    parser.add_argument("--tasks", type=int, default=20_000, help="no-op tasks in the burst (default 20,000)")
    parser.add_argument("--keys", type=int, default=500, help="VM ids the burst spreads over (default 500)")
    parser.add_argument("--history-keys", type=int, default=500, help="VM ids the history spreads over (500)")
    parser.add_argument("--shared-keys", action="store_true", help="history on the burst's keys (default: others)")
    parser.add_argument("--shards", type=int, default=4, help="daemon shards (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per case, alternating (default 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", help="a daemon setting for every run")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds a burst may take (600)")
    parser.add_argument("--keep-work-dir", action="store_true")
    parser.add_argument("--statements", action="store_true",
                        help="record each run's busiest statements (pg_stat_statements; restarts the server)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<stamp>-history)")
    args = parser.parse_args(argv)
    args.rows = args.rows or [1_000_000]
    if min(args.rows) < 1 or args.tasks < 1 or args.keys < 1 or args.history_keys < 1 or args.shards < 1 \
            or args.repeats < 1:
        parser.error("--rows, --tasks, --keys, --history-keys, --shards and --repeats must be >= 1")
    check_overrides(parser, args.set)
    out = args.out or RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-history"
    results = run(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(results, indent=1) + "\n")
    print(summary_text(results))
    print(f"took {results['wall_s']:.0f} s; wrote {out / 'history.json'}")
    failed = [r for r in results["runs"] if not r["complete"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
