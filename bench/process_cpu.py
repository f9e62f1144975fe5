"""Where a task's daemon CPU goes: CPU and context switches per task of each daemon process.

``bench.run`` reports the daemon's CPU as one figure (its process group). This
splits it: for one burst through the real daemon (private PostgreSQL, the bench
plugin's actions), each process's CPU per task (utime + stime, of which system
time), its time on a CPU from the scheduler (/proc/<pid>/schedstat, exact at
each switch), and its context switches per task (voluntary: it waited for
something; every wait is a wake later). PostgreSQL's CPU per task is the whole
server's, as ``bench.run`` measures it.

It also measures what a wait costs on this machine, with no daemon running: the
CPU time a process spends per ``time.sleep`` of 20 ms and of 2 ms (going to
sleep and being woken). On a virtual machine that is far from free, and a task
that waits for a message, a database reply and its action pays it three times
or more; that is the floor under a slow task's CPU.

::

    .venv/bin/python -m bench.process_cpu [--tasks 800] [--keys 100] [--ms 20] [--shards 4] [--repeats 1]
                                          [--out bench/results/<stamp>-process-cpu/process_cpu.json]

``--ms 0`` runs no-ops instead of 20 ms sleeps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench import measure
from bench.bounded_memory import role_of
from bench.harness import RESULTS_DIR, CpuWindow, Harness, insert_tasks, unfinished
from bench.runners import RunnerSpec
from bench.workloads import PlannedTask

SETTLE_SECONDS = 1.0  # after READY and every shard titled: connections open, nothing moving
RUN_TIMEOUT = 600.0
POLL_SECONDS = 0.1


def wait_cost_us(seconds: float, rounds: int) -> float:
    """Microseconds on a CPU per ``time.sleep(seconds)`` of this process (schedstat, updated at each switch)."""
    path = f"/proc/{os.getpid()}/schedstat"
    with open(path) as f:
        before = int(f.read().split()[0])
    for _ in range(rounds):
        time.sleep(seconds)
    with open(path) as f:
        after = int(f.read().split()[0])
    return (after - before) / rounds / 1000.0


def daemon_roles(leader: int) -> dict[int, str]:
    """{pid: role} of every process of the daemon whose supervisor is ``leader`` (its group)."""
    return {s.pid: role_of(s.pid, leader, measure.process_title(s.pid)) for s in measure.group_members(leader)}


def snapshot(roles: dict[int, str]) -> dict[int, dict[str, int] | None]:
    return {pid: measure.process_counters(pid) for pid in roles}


def per_task(roles: dict[int, str], before: dict[int, dict[str, int] | None],
             after: dict[int, dict[str, int] | None], tasks: int) -> list[dict[str, Any]]:
    """Each process's figures per task between two snapshots (those alive at both), by role."""
    processes = []
    for pid, role in sorted(roles.items(), key=lambda item: item[1]):
        a, b = before.get(pid), after.get(pid)
        if a is None or b is None:
            continue
        processes.append({
            "pid": pid, "role": role,
            "cpu_ms_per_task": round((b["ticks"] - a["ticks"]) / measure.CLOCK_TICKS * 1000 / tasks, 4),
            "system_ms_per_task": round((b["system_ticks"] - a["system_ticks"]) / measure.CLOCK_TICKS * 1000 / tasks,
                                        4),
            "on_cpu_ms_per_task": round((b["on_cpu_ns"] - a["on_cpu_ns"]) / 1e6 / tasks, 4),
            "voluntary_switches_per_task": round((b["voluntary"] - a["voluntary"]) / tasks, 3),
            "involuntary_switches_per_task": round((b["involuntary"] - a["involuntary"]) / tasks, 3),
        })
    return processes


def one_run(harness: Harness, args: argparse.Namespace, index: int) -> dict[str, Any]:
    action, ms = ("sleep", float(args.ms)) if args.ms > 0 else ("noop", 0.0)
    tasks = [PlannedTask(key=1 + n % args.keys, action=action, ms=ms) for n in range(args.tasks)]
    with harness.fresh_database() as dsn:
        runner = harness.start(RunnerSpec("taskomatic", args.shards, args.routing), dsn,
                               harness.base / f"run{index}", [])
        conn = psycopg2.connect(dsn, application_name="bench")
        try:
            runner.wait_ready()
            deadline = time.monotonic() + 60
            while sum(r.startswith("shard ") for r in daemon_roles(runner.pid).values()) < args.shards:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{args.shards} shards not titled within 60 s:\n{runner.log_tail()}")
                time.sleep(POLL_SECONDS)
            time.sleep(SETTLE_SECONDS)
            roles = daemon_roles(runner.pid)
            before = snapshot(roles)
            window = CpuWindow([runner.pid], harness.local_postmaster_pid)
            insert_tasks(conn, tasks)
            deadline = time.monotonic() + RUN_TIMEOUT
            while unfinished(conn):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{args.tasks} tasks not done within {RUN_TIMEOUT:.0f} s")
                time.sleep(POLL_SECONDS)
            after = snapshot(roles)
            usage = window.close()
        finally:
            conn.close()
            harness.stop(runner)
    processes = per_task(roles, before, after, args.tasks)
    shards = [p for p in processes if p["role"].startswith("shard ")]
    return {
        "processes": processes,
        "daemon_on_cpu_ms_per_task": round(sum(p["on_cpu_ms_per_task"] for p in processes), 4),
        "daemon_cpu_ms_per_task": round(sum(p["cpu_ms_per_task"] for p in processes), 4),
        "shards_on_cpu_ms_per_task": round(sum(p["on_cpu_ms_per_task"] for p in shards), 4),
        "postgres_cpu_ms_per_task": round(usage.postgres_s * 1000 / args.tasks, 4),
        "other_share": usage.other_share,
    }


def _print(run: dict[str, Any]) -> None:
    for p in run["processes"]:
        print(f"  {p['role']:<12} CPU {p['cpu_ms_per_task']:.3f} ms/task (system {p['system_ms_per_task']:.3f}), "
              f"on a CPU {p['on_cpu_ms_per_task']:.3f} ms, switches {p['voluntary_switches_per_task']:.2f} "
              f"voluntary + {p['involuntary_switches_per_task']:.2f}")
    print(f"  daemon {run['daemon_on_cpu_ms_per_task']:.3f} ms/task on a CPU (shards "
          f"{run['shards_on_cpu_ms_per_task']:.3f}); PostgreSQL {run['postgres_cpu_ms_per_task']:.3f} ms/task; "
          f"other load {run['other_share']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=800)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--ms", type=float, default=20.0, help="each task sleeps this long (0: no-ops)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--routing", choices=("pinned", "hash"), default="pinned")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.keys < 1 or args.shards < 1 or args.repeats < 1 or args.ms < 0:
        parser.error("--tasks, --keys, --shards and --repeats must be positive, --ms not negative")
    stamp = datetime.now(UTC)
    out = args.out or RESULTS_DIR / f"{stamp:%Y%m%d-%H%M%S}-process-cpu" / "process_cpu.json"
    calibration = {"sleep_20ms_us": round(wait_cost_us(0.02, 100), 1),
                   "sleep_2ms_us": round(wait_cost_us(0.002, 200), 1)}
    print(f"one wait on this machine, on a CPU: time.sleep(20 ms) {calibration['sleep_20ms_us']} us, "
          f"time.sleep(2 ms) {calibration['sleep_2ms_us']} us")
    runs = []
    with Harness("taskomatic-processcpu-", announce="work directory") as harness:
        for index in range(args.repeats):
            what = f"{args.ms:g} ms sleeps" if args.ms > 0 else "no-ops"
            print(f"run {index + 1}: {args.tasks} {what} over {args.keys} keys, {args.shards} shards ({args.routing})")
            run = one_run(harness, args, index)
            _print(run)
            runs.append(run)
        machine = harness.machine
    report = {"command": "python -m bench.process_cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started_at": stamp.isoformat(timespec="seconds"), "machine": machine,
              "settings": {"tasks": args.tasks, "keys": args.keys, "ms": args.ms, "shards": args.shards,
                           "routing": args.routing},
              "wait_cost": calibration, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
