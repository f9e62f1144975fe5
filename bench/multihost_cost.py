"""Where a multihost task's extra cost goes: ``python -m bench.multihost_cost``.

Issue 13 asks one multihost instance for 0.8x standalone's throughput on the
same burst. This bench runs exactly that pair, alternating (standalone,
multihost, multihost, standalone, ...) so the machine's drift hits both: one
private PostgreSQL, a fresh migrated database per run, one instance of
``--shards`` shards (2), ``--tasks`` no-ops (20,000) over ``--keys`` VMs (500)
queued in one INSERT once the instance is ready (in multihost, once it holds
every partition). Per run:

* tasks/s: finished tasks / (last end - first start), and per-key order;
* CPU per task of each daemon process by role (fetcher, shard N, ...) and of
  PostgreSQL's process tree;
* the database's transactions per task;
* MultiXact SLRU page accesses (``pg_stat_slru`` hits and reads, server-wide):
  a row locked FOR SHARE by two transactions at once gets a MultiXact, and the
  fenced statements of multihost share-lock lease rows (docs/partitions.md);
* with ``--statements`` (pg_stat_statements; restarts the server): each
  statement's calls and rows, and its execution time and buffer hits per task.
  The bench's own statements (the INSERT of the burst, the polls, the
  counters) are named ``bench: ...``.

The counters of transactions and SLRU pages are read once the instance is
ready; PostgreSQL publishes a backend's counters up to a second late, so an
instance's start-up work can add a few. A first standalone run (``--warmup``)
warms the server after its start and is left out of the summary. The summary
holds the medians per mode (a statement a run did not list counts as 0 there)
and multihost / standalone. Printed, and
written as ``bench/results/<stamp>-multihost-cost/multihost_cost.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench import measure
from bench.harness import (
    MULTIHOST,
    RESULTS_DIR,
    CpuUsage,
    CpuWindow,
    Harness,
    check_overrides,
    daemon_config,
    fetch_rows,
    insert_tasks,
)
from bench.history import burst_figures, enable_statements, reset_statements, wait_all_ended
from bench.multihost.scaling import database_transactions, wait_balanced
from bench.runners import Runner, RunnerFailed, RunnerSpec
from bench.workloads import Workload, generate

MODES = ("standalone", "multihost")
POLL_SECONDS = 0.05

STATEMENTS_SQL = """
SELECT calls, total_exec_time AS total_ms, rows, shared_blks_hit AS hit,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 400) AS query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time DESC LIMIT %(limit)s
"""

# PostgreSQL 17 renamed the SLRUs (MultiXactOffset -> multixact_offset): match both spellings.
MULTIXACT_SQL = ("SELECT coalesce(sum(blks_hit + blks_read), 0) AS blocks FROM pg_stat_slru "
                 "WHERE lower(replace(name, '_', '')) IN ('multixactoffset', 'multixactmember')")
# What the bench itself sends (the burst, its polls and counters), told apart from the daemon's statements.
BENCH_STATEMENTS = ("INSERT INTO tasks", "SELECT EXISTS (SELECT", "SELECT xact_commit", "SELECT coalesce(sum(blks_hit",
                    "SELECT pg_stat_statements_reset", "CREATE EXTENSION", "SELECT count(DISTINCT instance_id)")
BENCH_PREFIX = "bench: "  # statement_name's mark of the bench's own statements


def statement_name(query: str) -> str:
    """A stable name: the prepared statement's (``PREPARE "tkm_end_and_start" ...`` -> ``end_and_start``),
    else ``bench: `` and the text for the bench's own, else the text (whole: some of the daemon's
    statements share their first hundred characters)."""
    prepared = re.match(r'PREPARE "tkm_(\w+)"', query)
    if prepared:
        return prepared.group(1)
    return f"{BENCH_PREFIX}{query}" if query.startswith(BENCH_STATEMENTS) else query


def roles_of(runner: Runner, members: list[measure.ProcStat]) -> dict[int, str]:
    """pid -> role (fetcher, shard 0, ...) of the runner's processes."""
    return {s.pid: measure.daemon_role(measure.process_title(s.pid), s.pid == runner.pid) for s in members}


def cpu_by_role(before: list[measure.ProcStat], after: list[measure.ProcStat], roles: dict[int, str],
                tasks: int) -> dict[str, float]:
    """Milliseconds of CPU per task of each role that used any (a role's processes added up).

    A process gone by ``after`` was reaped by its parent, whose reaped ticks now hold its whole
    lifetime: its ticks at ``before`` come off the parent's role (as ``measure.cpu_seconds`` does)."""
    start = {(s.pid, s.starttime): s.own_ticks + s.reaped_ticks for s in before}
    alive = {(s.pid, s.starttime) for s in after}
    used: dict[str, float] = {}
    for s in after:
        ticks = s.own_ticks + s.reaped_ticks - start.get((s.pid, s.starttime), 0)
        role = roles.get(s.pid, "?")
        used[role] = used.get(role, 0.0) + ticks / measure.CLOCK_TICKS
    for s in before:
        if (s.pid, s.starttime) not in alive:
            role = roles.get(s.ppid, "?")
            used[role] = used.get(role, 0.0) - (s.own_ticks + s.reaped_ticks) / measure.CLOCK_TICKS
    return {role: round(seconds / tasks * 1000, 4) for role, seconds in sorted(used.items()) if seconds > 0}


def statements_per_task(conn: Any, tasks: int, limit: int = 40) -> list[dict[str, Any]]:
    """The busiest statements of this database: calls and rows in all, time and buffer hits per task."""
    rows = fetch_rows(conn, STATEMENTS_SQL, {"limit": limit})
    conn.rollback()
    return [{"name": statement_name(r["query"]), "calls": int(r["calls"]),
             "exec_us_per_task": round(r["total_ms"] * 1000 / tasks, 2),
             "hits_per_task": round(int(r["hit"]) / tasks, 2), "rows": int(r["rows"]), "query": r["query"]}
            for r in rows]


def one_run(harness: Harness, args: argparse.Namespace, mode: str, index: int) -> dict[str, Any]:
    """One burst on a fresh database with one instance in ``mode``; every figure."""
    planned = generate(Workload("noop-uniform", args.tasks, args.keys), args.seed)
    result: dict[str, Any] = {"mode": mode, "complete": False, "error": None}
    settings = [*([MULTIHOST] if mode == "multihost" else []), *(args.set or [])]
    with harness.fresh_database() as dsn:
        conn = psycopg2.connect(dsn, application_name="bench multihost_cost")
        conn.autocommit = True
        try:
            runner = harness.start(RunnerSpec("taskomatic", args.shards), dsn,
                                   harness.base / f"run{index:02d}-{mode}", settings)
            try:
                result["ready_s"] = round(runner.wait_ready(), 3)
                if mode == "multihost" and wait_balanced(conn, 1) is None:
                    raise RunnerFailed("the instance did not take every partition within 60 s")
                if args.statements:
                    reset_statements(conn)
                members = measure.group_members(runner.pid)
                roles = roles_of(runner, members)
                xacts, multixact = database_transactions(conn), int(fetch_rows(conn, MULTIXACT_SQL)[0]["blocks"])
                window = CpuWindow([runner.pid], harness.local_postmaster_pid)
                insert_tasks(conn, planned)
                wait_all_ended(conn, runner, args.run_timeout, POLL_SECONDS)
                cpu = window.close()
                after = measure.group_members(runner.pid)
            except (RunnerFailed, psycopg2.Error) as exc:
                result["error"] = f"{type(exc).__name__}: {exc}"
                return result
            finally:
                result["exit_code"] = harness.stop(runner)
            time.sleep(0.5)  # the daemon's backends have exited; their statistics land
            collect_figures(result, conn, args, cpu, cpu_by_role(members, after, roles, args.tasks), xacts,
                            multixact)
        except psycopg2.Error as exc:  # reading the figures failed: this run has none, the others stand
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
    return result


def collect_figures(result: dict[str, Any], conn: Any, args: argparse.Namespace, cpu: CpuUsage,
                    by_role: dict[str, float], xacts: int, multixact: int) -> None:
    """The run's figures, read once the daemon has stopped."""
    result["cpu_ms_per_task"] = {
        **by_role,
        "daemon": round(cpu.groups_s[0] / args.tasks * 1000, 4),
        "postgres": round(cpu.postgres_s / args.tasks * 1000, 4),
    }
    result["other_share"] = cpu.other_share
    result["transactions_per_task"] = round((database_transactions(conn) - xacts) / args.tasks, 3)
    result["multixact_slru_blocks"] = int(fetch_rows(conn, MULTIXACT_SQL)[0]["blocks"]) - multixact
    if args.statements:
        result["statements"] = statements_per_task(conn, args.tasks)
    result.update(burst_figures(conn, 0, args.tasks))
    result["complete"] = (result["finished"] == args.tasks and result["order_violations"] == 0
                          and result["exit_code"] == 0)


def _statement(run: dict[str, Any], name: str) -> dict[str, Any]:
    """The run's figures of that statement; nothing (so 0 in a median) if the run did not list it."""
    return next((s for s in run.get("statements", []) if s["name"] == name), {})


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per mode (tasks/s, CPU per task by role, transactions per task, each statement's figures
    per task) and the multihost / standalone ratio of each."""
    per_mode: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        done = [r for r in runs if r["mode"] == mode and r["complete"] and not r.get("warmup")]
        roles = sorted({role for r in done for role in r["cpu_ms_per_task"]})
        names = sorted({s["name"] for r in done for s in r.get("statements", [])})
        per_mode[mode] = {
            "runs": len(done),
            "throughput_tps": _median([r["throughput_tps"] for r in done if r["throughput_tps"]]),
            "cpu_ms_per_task": {role: _median([r["cpu_ms_per_task"].get(role, 0.0) for r in done])
                                for role in roles},
            "transactions_per_task": _median([r["transactions_per_task"] for r in done]),
            "multixact_slru_blocks": _median([r["multixact_slru_blocks"] for r in done]),
            "statements": {name: {figure: _median([_statement(r, name).get(figure, 0) for r in done])
                                  for figure in ("exec_us_per_task", "hits_per_task", "calls")}
                           for name in names},
        }
        # Buffer hits of the daemon's statements per task: the database's work, counted, so it does not
        # move with the machine's noise as CPU time and tasks/s do (only with --statements).
        per_mode[mode]["daemon_hits_per_task"] = _median(
            [sum(s["hits_per_task"] for s in r["statements"] if not s["name"].startswith(BENCH_PREFIX))
             for r in done if r.get("statements")])
    sa, mh = per_mode["standalone"], per_mode["multihost"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    return {**per_mode, "multihost_over_standalone": {
        "throughput": ratio(mh["throughput_tps"], sa["throughput_tps"]),
        "throughput_paired": paired_ratios(runs),
        "cpu": {role: ratio(mh["cpu_ms_per_task"].get(role), sa["cpu_ms_per_task"].get(role))
                for role in ("daemon", "postgres", "fetcher")},
        "daemon_hits": ratio(mh["daemon_hits_per_task"], sa["daemon_hits_per_task"]),
    }}


def paired_ratios(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Multihost / standalone tasks/s of each round's two runs, back to back on the same machine state:
    a drift of the machine's speed over the batch moves both runs of a round alike. Their median and range;
    None without a round whose two runs both completed."""
    rounds: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.get("round") is not None and r["complete"] and r["throughput_tps"] and not r.get("warmup"):
            rounds.setdefault(r["round"], {})[r["mode"]] = r["throughput_tps"]
    ratios = [pair["multihost"] / pair["standalone"] for pair in rounds.values() if len(pair) == 2]
    if not ratios:
        return None
    return {"rounds": len(ratios), "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.now(UTC)
    wall = time.monotonic()
    runs: list[dict[str, Any]] = []
    with Harness("taskomatic-multihost-cost-", args.keep_work_dir, announce="bench work directory") as harness:
        if args.statements:
            enable_statements(harness)
        for index in range(args.warmup):
            print(f"warm-up {index + 1}: standalone ...", file=sys.stderr, flush=True)
            result = one_run(harness, args, "standalone", len(runs) + 1)
            result["warmup"] = True
            runs.append(result)
            print("  " + one_line(result), file=sys.stderr, flush=True)
        for round_index in range(args.rounds):
            # standalone first in even rounds, multihost first in odd ones (drift hits both alike)
            for mode in MODES if round_index % 2 == 0 else MODES[::-1]:
                print(f"run {len(runs) + 1}: {mode} ...", file=sys.stderr, flush=True)
                result = one_run(harness, args, mode, len(runs) + 1)
                result["round"] = round_index
                runs.append(result)
                print("  " + one_line(result), file=sys.stderr, flush=True)
        machine = harness.machine
    return {
        "benchmark": "multihost_cost",
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - wall, 1),
        "command": " ".join(sys.argv),
        "machine": machine,
        "settings": {"tasks": args.tasks, "keys": args.keys, "shards": args.shards, "rounds": args.rounds,
                     "warmup": args.warmup,
                     "seed": args.seed, "statements": args.statements, "daemon": daemon_config(args.set or [])},
        "runs": runs,
        "summary": summarise(runs),
        "target": "one multihost instance >= 0.8x standalone's tasks/s (issue 13)",
    }


def one_line(run: dict[str, Any]) -> str:
    if run["error"]:
        return f"FAILED: {run['error'].splitlines()[0]}"
    if not run["complete"]:
        return (f"INCOMPLETE: {run['finished']:,} of {run['expected']:,} tasks finished, order violations "
                f"{run['order_violations']}, exit code {run['exit_code']}")
    cpu = run["cpu_ms_per_task"]
    return (f"{run['throughput_tps']:,.0f} tasks/s, daemon {cpu['daemon']:.4f} ms/task, PostgreSQL "
            f"{cpu['postgres']:.4f} ms/task, {run['transactions_per_task']:.3f} transactions/task, "
            f"MultiXact SLRU pages {run['multixact_slru_blocks']}, other load {run['other_share']:.0%}, "
            f"order violations {run['order_violations']}")


def summary_text(results: dict[str, Any]) -> str:
    s, summary = results["settings"], results["summary"]
    lines = [f"{s['tasks']:,} no-op tasks over {s['keys']} keys, one instance of {s['shards']} shards, burst; "
             f"medians of {s['rounds']} runs per mode:"]
    for mode in MODES:
        m = summary[mode]
        cpu = ", ".join(f"{role} {ms:.4f}" for role, ms in m["cpu_ms_per_task"].items() if ms is not None)
        lines.append(f"  {mode}: {m['throughput_tps'] or 0:,.0f} tasks/s; CPU ms/task: {cpu}; "
                     f"{m['transactions_per_task']} transactions/task; MultiXact SLRU pages read or hit "
                     f"{m['multixact_slru_blocks']}")
        for name, figures in sorted(m["statements"].items(), key=lambda kv: -(kv[1]["exec_us_per_task"] or 0)):
            lines.append(f"      {figures['exec_us_per_task'] or 0:8.2f} us/task {figures['hits_per_task'] or 0:7.2f} "
                         f"hits/task {figures['calls'] or 0:8.0f} calls  {name[:100]}")
    ratios = summary["multihost_over_standalone"]
    lines.append(f"  multihost / standalone: tasks/s {ratios['throughput']}, CPU per task "
                 + ", ".join(f"{role} {value}" for role, value in ratios["cpu"].items()))
    paired = ratios.get("throughput_paired")
    if paired:
        lines.append(f"  paired by round: tasks/s median {paired['median']} over {paired['rounds']} rounds "
                     f"(range {paired['min']}-{paired['max']})")
    if ratios.get("daemon_hits"):
        lines.append(f"  buffer hits of the daemon's statements per task: standalone "
                     f"{summary['standalone']['daemon_hits_per_task']}, multihost "
                     f"{summary['multihost']['daemon_hits_per_task']} ({ratios['daemon_hits']}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multihost_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="no-op tasks in the burst (default 20,000)")
    parser.add_argument("--keys", type=int, default=500, help="VM ids the burst spreads over (default 500)")
    parser.add_argument("--shards", type=int, default=2, help="shards of the instance (default 2, as bench.multihost)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="runs per mode, alternating which goes first (default 4; even, so each leads as often)")
    parser.add_argument("--warmup", type=int, default=1, help="standalone runs first, left out (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", help="a daemon setting for every run")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="seconds a burst may take (600)")
    parser.add_argument("--statements", action="store_true",
                        help="each statement's figures per task (pg_stat_statements; restarts the server)")
    parser.add_argument("--keep-work-dir", action="store_true")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<stamp>-multihost-cost)")
    args = parser.parse_args(argv)
    check_overrides(parser, args.set, [MULTIHOST])
    results = run(args)
    out = args.out or RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-multihost-cost"
    out.mkdir(parents=True, exist_ok=True)
    (out / "multihost_cost.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(summary_text(results))
    print(f"took {results['wall_s']:.0f} s; wrote {out / 'multihost_cost.json'}")
    failed = [r for r in results["runs"] if not r["complete"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
