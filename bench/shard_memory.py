"""Shard memory by child start method: RSS, PSS and USS of every process of an idle daemon.

For each ``child_start`` (spawn: each child a fresh interpreter; forkserver: forked from a preloaded,
gc-frozen fork server) and each shard count, starts the real daemon against a private PostgreSQL,
waits until every child has its title, lets it settle, and reads /proc/<pid>/smaps_rollup of each
process of its group. Prints a table and writes the JSON::

    .venv/bin/python -m bench.shard_memory [--shards 1 4] [--tasks N] [--out bench/RESULTS/shard_memory.json]

``--tasks N``: run N no-ops (the bench plugin's) over 64 keys first, so the figures are those of shards
that have worked (their connections used, their caches filled), not only of idle ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2

from bench import measure
from bench.bounded_memory import role_of, smaps_rollup
from bench.harness import Harness, insert_tasks, unfinished
from bench.runners import RunnerSpec
from bench.workloads import PlannedTask

METHODS = ("spawn", "forkserver")
SETTLE_SECONDS = 3.0  # after the last child got its title: imports done, connections open
KEYS = 64  # --tasks spreads its no-ops over this many ordering keys (every shard gets some)


def _titled_roles(pgid: int) -> dict[int, str]:
    return {s.pid: role_of(s.pid, pgid, measure.process_title(s.pid)) for s in measure.group_members(pgid)}


def _run_noops(dsn: str, tasks: int) -> None:
    """Queue ``tasks`` no-ops over KEYS keys and wait until every one has ended."""
    conn = psycopg2.connect(dsn)
    try:
        insert_tasks(conn, [PlannedTask(key=1 + n % KEYS, action="noop", ms=0.0) for n in range(tasks)])
        deadline = time.monotonic() + 300
        while unfinished(conn):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{tasks} no-ops not done within 300 s")
            time.sleep(0.2)
    finally:
        conn.close()


def sample_instance(harness: Harness, method: str, shards: int, tasks: int = 0) -> dict[str, Any]:
    """Start one daemon, wait for its children (and run ``tasks`` no-ops), read each process's memory, stop it."""
    with harness.fresh_database() as dsn:
        runner = harness.start(RunnerSpec("taskomatic", shards), dsn, harness.base / f"{method}-{shards}",
                               [f"child_start={method}"])
        try:
            runner.wait_ready()
            deadline = time.monotonic() + 60
            while sum(r.startswith("shard ") for r in _titled_roles(runner.pid).values()) < shards:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{shards} shards not titled within 60 s:\n{runner.log_tail()}")
                time.sleep(0.2)
            if tasks:
                _run_noops(dsn, tasks)
            time.sleep(SETTLE_SECONDS)
            processes: list[dict[str, Any]] = []
            for pid, role in sorted(_titled_roles(runner.pid).items()):
                mem = smaps_rollup(pid)
                if mem is not None:
                    processes.append({"pid": pid, "role": role, **mem})
        finally:
            harness.stop(runner)
    shard_rows = [p for p in processes if p["role"].startswith("shard ")]
    return {
        "child_start": method, "shards": shards, "tasks_run": tasks, "processes": processes,
        "total_rss_kb": sum(p["rss_kb"] for p in processes),
        "total_pss_kb": sum(p["pss_kb"] for p in processes),
        "total_uss_kb": sum(p["uss_kb"] for p in processes),
        "shard_uss_kb": [p["uss_kb"] for p in shard_rows],
        "shard_pss_kb": [p["pss_kb"] for p in shard_rows],
    }


def _print(result: dict[str, Any]) -> None:
    print(f"\nchild_start={result['child_start']} shards={result['shards']} after {result['tasks_run']} no-ops: "
          f"total RSS {result['total_rss_kb'] / 1024:.1f} MB, PSS {result['total_pss_kb'] / 1024:.1f} MB, "
          f"USS {result['total_uss_kb'] / 1024:.1f} MB")
    for p in result["processes"]:
        print(f"  {p['role']:<18} pid {p['pid']:>7}  RSS {p['rss_kb'] / 1024:6.1f}  PSS {p['pss_kb'] / 1024:6.1f}"
              f"  USS {p['uss_kb'] / 1024:6.1f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tasks", type=int, default=0, help="run this many no-ops before sampling")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    results = []
    with Harness("taskomatic-shardmem-", announce="work directory") as harness:
        for method in args.methods:
            for shards in args.shards:
                result = sample_instance(harness, method, shards, args.tasks)
                _print(result)
                results.append(result)
        machine = harness.machine
    load = f"{args.tasks} no-ops over {KEYS} keys run first, then idle; " if args.tasks else "idle (no tasks); "
    load += f"sampled {SETTLE_SECONDS:g} s after the last shard set its title (and the no-ops ended)"
    report = {"command": "python -m bench.shard_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine, "load": load,
              "results": results}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
