"""A bounded instance under a huge backlog: ``python -m bench.bounded`` (issue 5).

Two of issue 5's measurements: the daemon with **1,000,000 queued tasks**
(does it hold only what its claim capacity allows, does its memory level off,
does the backlog slow claiming down?) and **<= 30 MB RSS per shard** (and where
a shard's memory goes).

One private PostgreSQL (EmbeddedPostgres, fsync on), a fresh migrated
database. ``--tasks`` ``noop`` tasks over ``--keys`` VM ids are queued in one
``INSERT ... SELECT FROM generate_series`` (through the table's triggers; the
insert is timed), then the real daemon starts (``python -m taskomatic --shards
4`` through :class:`bench.runners.Runner`, with the bench's plugin and an empty
configuration) and works through the backlog until every task has ended (or
``--seconds``, or the timeout). Every ``--interval`` seconds the bench samples:

* every daemon process's RSS, PSS and USS (``/proc/<pid>/smaps_rollup``: Rss,
  Pss, Private_Clean + Private_Dirty), its role from its process title;
* tasks ended so far and tasks held by the instance (``claimed_by`` set, state
  queued or running), both from indexes, O(held) per sample: held is a count
  over the partial index ``tasks_held_idx`` (``tasks_claimed_idx`` before migration 0010); unclaimed is the span of ids
  from the first id in ``tasks_claimable_idx`` to the last id inserted (the
  insert's ids are contiguous, checked, and a single instance claims the
  oldest first), and ended = tasks - unclaimed - held. The final counts come
  from a full scan after the daemon stopped;
* CPU seconds of PostgreSQL's process tree and of the daemon's process group.

Afterwards, in fresh ``python -c`` subprocesses: the RSS of the interpreter
alone and after importing psycopg2, libvirt, multiprocess, prometheus_client
and ``taskomatic.runtime.shard`` (cumulatively, and each alone), so the report
can say where a shard's memory goes (``bench/bounded_memory.py``). Results
(``bench/bounded_report.py``): printed, and ``bench/results/<stamp>-bounded/``:
``bounded.json`` and ``bounded.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench import measure
from bench.bounded_memory import by_role, import_breakdown, is_titled, mapping_breakdown, role_of, sample_processes
from bench.bounded_report import analyse, plot, summary, to_json
from bench.harness import NOOP_BACKLOG_SQL, RESULTS_DIR, Harness, Interrupted, create_database
from bench.runners import Runner, RunnerFailed, RunnerSpec

# One statement, one snapshot; both read partial indexes only.
SAMPLE_SQL = """
SELECT (SELECT min(id) FROM tasks WHERE state = 'queued' AND claimed_by IS NULL) AS first_unclaimed,
       (SELECT count(*) FROM tasks WHERE claimed_by IS NOT NULL AND state IN ('queued', 'running')) AS held,
       (SELECT analyze_count + autoanalyze_count FROM pg_stat_user_tables WHERE relname = 'tasks') AS analyzes
"""

FINAL_SQL = """
SELECT count(*) AS total,
       count(*) FILTER (WHERE state = 'finished') AS finished,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       count(*) FILTER (WHERE state IN ('queued', 'running')) AS unfinished,
       extract(epoch FROM min(time_started))::float8 AS first_start,
       extract(epoch FROM max(time_ended))::float8 AS last_end
FROM tasks
"""

# -- the database ---------------------------------------------------------------------------


def queue_backlog(conn: Any, tasks: int, keys: int) -> dict[str, Any]:
    """The backlog in one statement; (seconds, first id, last id, contiguous)."""
    with conn.cursor() as cur:
        start = time.monotonic()
        cur.execute(NOOP_BACKLOG_SQL, {"rows": tasks, "keys": keys})
        conn.commit()
        seconds = time.monotonic() - start
        cur.execute("SELECT min(id), max(id), count(*), pg_total_relation_size('tasks') FROM tasks")
        first, last, count, size = cur.fetchone()
    conn.commit()
    return {"insert_s": round(seconds, 3), "first_id": first, "last_id": last, "rows": count,
            "contiguous": last - first + 1 == count == tasks, "table_mb_after_insert": round(size / 2**20, 1)}


def db_sample(conn: Any, tasks: int, last_id: int) -> tuple[int, int, int, int]:
    """(ended, held, unclaimed, ANALYZEs of tasks so far) from the indexes (see the module doc)."""
    with conn.cursor() as cur:
        cur.execute(SAMPLE_SQL)
        first_unclaimed, held, analyzes = cur.fetchone()
    conn.commit()
    unclaimed = 0 if first_unclaimed is None else last_id - first_unclaimed + 1
    return tasks - unclaimed - int(held), int(held), unclaimed, int(analyzes or 0)


def claim_plan(conn: Any, batch: int) -> str:
    """The plan the daemon's claim statement gets now (EXPLAIN without running it)."""
    from taskomatic.db.queries import query

    with conn.cursor() as cur:
        sql = cur.mogrify(query("claim_tasks"), {"instance_id": 0, "limit": batch}).decode()
        cur.execute("EXPLAIN " + sql)
        text = "\n".join(r[0] for r in cur.fetchall())
    conn.rollback()
    return text


def exact_counts(conn: Any) -> dict[str, Any]:
    with conn.cursor() as cur:
        cur.execute(FINAL_SQL)
        names = [d[0] for d in cur.description]
        row = dict(zip(names, cur.fetchone(), strict=True))
        cur.execute("SELECT pg_total_relation_size('tasks'), last_autoanalyze, last_autovacuum, "
                    "autoanalyze_count, autovacuum_count FROM pg_stat_user_tables WHERE relname = 'tasks'")
        size, analyzed, vacuumed, analyze_count, vacuum_count = cur.fetchone()
    conn.commit()
    row["table_mb"] = round(size / 2**20, 1)
    row["autoanalyze"] = {"last": analyzed.isoformat() if analyzed else None, "count": analyze_count}
    row["autovacuum"] = {"last": vacuumed.isoformat() if vacuumed else None, "count": vacuum_count}
    return row


# -- the run --------------------------------------------------------------------------------


def claim_capacity(shards: int, settings: list[str]) -> dict[str, Any]:
    from taskomatic import config as config_mod

    cfg = config_mod.load(os.devnull, environ={}, overrides=config_mod.parse_overrides(settings))
    return {"shards": shards, "max_claimed_per_shard": cfg.max_claimed_per_shard, "claim_batch": cfg.claim_batch,
            "capacity": shards * cfg.max_claimed_per_shard}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started_at = datetime.now(UTC)
    wall = time.monotonic()
    runner: Runner | None = None
    capacity = claim_capacity(args.shards, args.set)
    timeout = args.timeout if args.timeout else 120.0 + args.tasks / 250.0
    result: dict[str, Any] = {
        "benchmark": "bounded", "started_at": started_at.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.bounded", *sys.argv[1:]]),
        "settings": {"tasks": args.tasks, "keys": args.keys, "shards": args.shards, "interval_s": args.interval,
                     "seconds": args.seconds, "timeout_s": timeout,
                     "analyze_after_insert": args.analyze, "t0": "the daemon's launch",
                     "daemon_settings": args.set},
        "claim_capacity": capacity, "error": None,
    }
    samples: list[dict[str, Any]] = []
    roles: dict[int, str] = {}  # daemon pid -> role, once its title says
    with Harness("taskomatic-bounded-", args.keep_work_dir, template=False) as harness:
        result["machine"] = harness.machine
        pg_pid = harness.postmaster_pid
        try:
            dsn = create_database(harness.server_dsn, "bounded")
            conn = psycopg2.connect(dsn, application_name="bench")
            print(f"queueing {args.tasks:,} noop tasks over {args.keys:,} keys ...", file=sys.stderr, flush=True)
            backlog = queue_backlog(conn, args.tasks, args.keys)
            result["backlog"] = backlog
            print(f"  inserted in {backlog['insert_s']:.1f} s ({backlog['table_mb_after_insert']} MB)", file=sys.stderr,
                  flush=True)
            if not backlog["contiguous"]:
                raise RuntimeError(f"the backlog's ids are not contiguous: {backlog}")
            if args.analyze:
                start = time.monotonic()
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("ANALYZE tasks")
                conn.autocommit = False
                backlog["analyze_s"] = round(time.monotonic() - start, 3)
            backlog["claim_plan_at_launch"] = claim_plan(conn, capacity["claim_batch"])
            spec = RunnerSpec("taskomatic", args.shards)
            stats = measure.all_stats()
            pg_before = measure.cpu_snapshot(measure.tree_members(pg_pid, stats))
            machine_before, self_before = measure.machine_busy_seconds(), measure.self_cpu_seconds()
            # Sampling starts at the launch, not at READY: the fetcher claims and the shards run
            # while the rest of the daemon is still coming up. READY is awaited in a thread.
            t0 = time.monotonic()
            runner = harness.start(spec, dsn, harness.base / "daemon", args.set)
            daemon_before: measure.CpuSnapshot = {}  # the group did not exist: all its CPU counts
            ready: dict[str, Any] = {}
            started = runner

            def wait_ready() -> None:
                try:
                    started.wait_ready()
                    ready["s"] = time.monotonic() - t0
                except RunnerFailed as exc:
                    ready["error"] = str(exc)

            ready_thread = threading.Thread(target=wait_ready, name="wait-ready", daemon=True)
            ready_thread.start()
            print(f"  {spec.label} launched; sampling every {args.interval} s", file=sys.stderr, flush=True)
            limit = min(args.seconds, timeout) if args.seconds else timeout
            next_sample = t0
            last_print = t0
            while True:
                now = time.monotonic()
                if now < next_sample:
                    time.sleep(next_sample - now)
                next_sample += args.interval
                stats = measure.all_stats()
                t = time.monotonic() - t0
                procs = sample_processes(runner.pid, stats)
                pg_cpu = measure.cpu_seconds(pg_before, measure.cpu_snapshot(measure.tree_members(pg_pid, stats)))
                daemon_cpu = measure.cpu_seconds(daemon_before,
                                                 measure.cpu_snapshot(measure.group_members(runner.pid, stats)))
                q0 = time.monotonic()
                ended, held, unclaimed, analyzes = db_sample(conn, args.tasks, backlog["last_id"])
                query_ms = (time.monotonic() - q0) * 1000
                for pid, p in procs.items():
                    if is_titled(pid, runner.pid, p["title"]):
                        roles[pid] = role_of(pid, runner.pid, p["title"])
                samples.append({"t": round(t, 3), "ended": ended, "held": held, "unclaimed": unclaimed,
                                "analyzes": analyzes,
                                "pg_cpu_s": round(pg_cpu, 2), "daemon_cpu_s": round(daemon_cpu, 2),
                                "query_ms": round(query_ms, 2),
                                "procs": {pid: [p["rss_kb"], p["pss_kb"], p["uss_kb"]] for pid, p in procs.items()}})
                if time.monotonic() - last_print >= 10:
                    last_print = time.monotonic()
                    print(f"  t={t:6.1f}s ended {ended:>9,} held {held:>5,} unclaimed {unclaimed:>9,}",
                          file=sys.stderr, flush=True)
                if "error" in ready:
                    raise RunnerFailed(ready["error"])
                if ended >= args.tasks:
                    result["all_ended_s"] = round(t, 3)
                    break
                if runner.process.poll() is not None:
                    raise RunnerFailed(f"the daemon exited with {runner.process.returncode} mid-run:\n"
                                       f"{runner.log_tail()}")
                if t >= limit:
                    if not args.seconds or args.seconds > timeout:
                        result["error"] = f"not every task ended within {timeout:.0f} s"
                    break
            wall_run = time.monotonic() - t0
            machine_busy = measure.machine_busy_seconds() - machine_before
            bench_cpu = measure.self_cpu_seconds() - self_before
            members = measure.group_members(runner.pid)
            ready_thread.join(timeout=5)
            result["ready_s"] = round(ready["s"], 3) if "s" in ready else None
            result["mappings"] = {roles[pid]: mapping_breakdown(pid) for pid in sorted(roles)
                                  if roles[pid] in ("supervisor", "fetcher", "shard 0", "reconciler")}
            result["peak_rss_vmhwm"] = measure.peak_rss(members, lambda pid, title: role_of(pid, runner.pid, title)
                                                        if runner else "?")
            last = samples[-1]
            other = max(0.0, machine_busy - last["pg_cpu_s"] - last["daemon_cpu_s"] - bench_cpu)
            result["cpu"] = {"wall_s": round(wall_run, 3), "postgres_s": last["pg_cpu_s"],
                             "daemon_s": last["daemon_cpu_s"], "bench_s": round(bench_cpu, 3),
                             "machine_busy_s": round(machine_busy, 3), "other_s": round(other, 3),
                             "other_share": round(other / (wall_run * (os.cpu_count() or 1)), 4) if wall_run else None}
            result["daemon_exit_code"] = harness.stop(runner)
            result["daemon_log_tail"] = runner.log_tail(2000)
            runner = None
            result["final"] = exact_counts(conn)
            conn.close()
        except RunnerFailed as exc:
            result["error"] = str(exc)
        finally:
            if runner is not None:
                result.setdefault("daemon_exit_code", harness.stop(runner, timeout=5))
    if not args.no_breakdown:
        print("measuring the import breakdown ...", file=sys.stderr, flush=True)
        breakdown_plugin = Path(tempfile.mkdtemp(prefix="taskomatic-bounded-plugin-", dir="/tmp"))
        try:
            from bench.plugin import write_dist_info

            result["import_breakdown"] = import_breakdown(write_dist_info(breakdown_plugin))
        finally:
            shutil.rmtree(breakdown_plugin, ignore_errors=True)
    for sample in samples:
        sample["procs"] = by_role(sample["procs"], roles)
    result["samples"] = samples
    result.update(analyse(result, samples, args.tasks, capacity["capacity"]))
    result["wall_s"] = round(time.monotonic() - wall, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bounded", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, help="queued noop tasks (default 1,000,000; --smoke: 20,000)")
    parser.add_argument("--keys", type=int, help="distinct VM ids (default 5,000; --smoke: 500)")
    parser.add_argument("--shards", type=int, default=4, help="daemon shards (default 4)")
    parser.add_argument("--smoke", action="store_true", help="a small run for CI (20,000 tasks, 0.5 s samples)")
    parser.add_argument("--seconds", type=float, help="stop after this many seconds (default: when all ended)")
    parser.add_argument("--timeout", type=float, help="give up after this many seconds (default 120 + tasks/250)")
    parser.add_argument("--interval", type=float, help="seconds between samples (default 1.0; --smoke 0.5)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a daemon setting (as taskomatic --set); repeatable")
    parser.add_argument("--analyze", action="store_true",
                        help="ANALYZE tasks after the insert (default: leave it to autovacuum, as a real queue would)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the import breakdown subprocesses")
    parser.add_argument("--no-plot", action="store_true", help="no PNG")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the daemon's log and PostgreSQL's data")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<stamp>-bounded)")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only re-render the PNG next to a bounded.json and print its summary")
    args = parser.parse_args(argv)
    if args.replot:
        results = json.loads(args.replot.read_text())
        plot(results, args.replot.with_name("bounded.png"))
        print(summary(results))
        return 0
    args.tasks = args.tasks if args.tasks is not None else (20_000 if args.smoke else 1_000_000)
    args.keys = args.keys if args.keys is not None else (500 if args.smoke else 5_000)
    args.interval = args.interval if args.interval is not None else (0.5 if args.smoke else 1.0)
    if args.tasks < 1 or args.keys < 1 or args.shards < 1 or args.interval <= 0:
        parser.error("--tasks, --keys, --shards >= 1 and --interval > 0")
    out = args.out or RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-bounded"
    try:
        results = run(args)
    except (KeyboardInterrupt, Interrupted):
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    out.mkdir(parents=True, exist_ok=True)
    (out / "bounded.json").write_text(to_json(results))
    if not args.no_plot and results["samples"]:
        try:
            plot(results, out / "bounded.png")
        except ImportError:
            print("matplotlib missing: no plot", file=sys.stderr)
    print(summary(results))
    print(f"took {results['wall_s']:.0f} s; wrote {out}")
    checks_ok = results["complete"] and results["held"]["bounded"]
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())

