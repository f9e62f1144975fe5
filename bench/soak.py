"""The soak: a long VM lifecycle load through the real daemon, measured over time: ``python -m bench.soak``.

Two configurations, each on a fresh database and two fresh libvirt test nodes
(``bench.lifecycle``: a session ``libvirtd`` each, the test driver behind a
real daemon), with the same seeded lifecycle workload (``bench.workloads``):

* **standalone**: one instance, ``--shards 8`` (smoke: 2);
* **multihost**: three instances in multihost mode, 2 shards each (smoke: 2
  instances, 1 shard each).

The tasks are queued at a steady rate (one INSERT every 0.05 s, in workload
order), so the run lasts long enough to show trends. Every ``--interval``
seconds (1 s; smoke 0.25 s) the bench samples the RSS of every daemon process
(by pid: supervisor, fetcher, each shard, the reconciler; the process title
says which), the daemon's connections in ``pg_stat_activity`` (by
``application_name``), the client sockets of each node's ``libvirtd`` (its
``/proc/<pid>/fd`` against ``/proc/net/unix``), the nodes' RSS, and the queued,
running and ended task counts (``bench/soak_sampling.py``). Once every task
has ended it keeps sampling the idle daemon for a few seconds (the "end" of the connection verdicts), stops
the daemon (SIGTERM), and checks the tables and the nodes.

Verdicts (``bench/soak_verdicts.py``, where each is defined): memory that does
not level off, backlog at the end, leaked connections, restarted processes,
and the lifecycle checks (every task ended once, per-key order, VM rows agree
with the domains). Output: JSON (with the machine), ``summary.md`` and PNG
plots under ``bench/results/soak-<stamp>/`` (or ``--out``). Exit code 1 when a
verdict failed. See bench/SOAK.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench import lifecycle, measure
from bench import soak_verdicts as verdicts
from bench.harness import (
    MULTIHOST,
    RESULTS_DIR,
    Harness,
    Interrupted,
    check_overrides,
    check_running,
    daemon_config,
    insert_tasks,
    log_lines,
)
from bench.runners import Runner, RunnerFailed, RunnerSpec
from bench.soak_sampling import BENCH_APP, Sampler, cpu_figures
from bench.soak_verdicts import compute_verdicts, verdict_flags, verdicts_ok
from bench.workloads import PlannedTask, Workload, generate, lifecycle_final_states

SCHEMA_VERSION = 1
FEED_TICK = 0.05  # seconds between inserts of what is due


@dataclass(frozen=True)
class Setup:
    """One configuration: how many instances, shards each, multihost or not, the arrival rate."""

    name: str
    instances: int
    shards: int
    multihost: bool
    rate: float  # tasks/s

    @property
    def label(self) -> str:
        if self.multihost:
            return f"{self.instances} multihost instances x {self.shards} shards"
        return f"1 standalone instance, {self.shards} shards"


@dataclass(frozen=True)
class Size:
    name: str
    tasks: int
    vms: int
    interval: float  # seconds between samples
    tail_s: float  # idle sampling after the last task ended
    setups: tuple[Setup, ...]


SIZES = {
    "full": Size("full", 100_000, 5_000, 1.0, 15.0,
                 (Setup("standalone", 1, 8, False, 170.0), Setup("multihost", 3, 2, True, 170.0))),
    "quick": Size("quick", 10_000, 500, 1.0, 8.0,
                  (Setup("standalone", 1, 8, False, 170.0), Setup("multihost", 3, 2, True, 170.0))),
    "smoke": Size("smoke", 600, 60, 0.25, 2.0,
                  (Setup("standalone", 1, 2, False, 100.0), Setup("multihost", 2, 1, True, 80.0))),
}


def workload_for(size: Size, rate: float) -> Workload:
    """The same tasks for every setup of a size (the name and seed decide them; the rate does not)."""
    return Workload(f"soak-{size.name}", size.tasks, size.vms, latency="lifecycle", arrival="steady", rate=rate)



# -- one configuration ----------------------------------------------------------------------------------


@dataclass
class Ctx:
    harness: Harness
    overrides: list[str]
    bar: Any


def run_setup(ctx: Ctx, size: Size, setup: Setup, tasks: list[PlannedTask], index: int) -> dict[str, Any]:
    result: dict[str, Any] = {"setup": setup.name, "label": setup.label, "instances": setup.instances,
                              "shards_per_instance": setup.shards, "mode": "multihost" if setup.multihost
                              else "standalone", "rate_tps": setup.rate, "tasks": len(tasks), "vms": size.vms,
                              "interval_s": size.interval, "error": None}
    wall_start = time.monotonic()
    harness = ctx.harness
    with harness.fresh_database() as dsn:
        nodes = lifecycle.Nodes(lifecycle.short_dir(harness.base, index))
        harness.nodes.append(nodes)
        runners: list[Runner] = []
        conn = None
        try:
            nodes.start()
            host_ids = lifecycle.seed_database(dsn, nodes.uris, size.vms)
            settings = [*nodes.daemon_settings(), *([MULTIHOST] if setup.multihost else []), *ctx.overrides]
            run_dir = harness.base / f"run{index:02d}-{setup.name}"
            for i in range(setup.instances):
                runners.append(harness.start(RunnerSpec("taskomatic", setup.shards), dsn, run_dir / f"instance{i + 1}",
                                             settings))
            result["ready_s"] = [round(r.wait_ready(), 3) for r in runners]
            conn = psycopg2.connect(dsn, application_name=BENCH_APP)
            sampler = Sampler(conn, runners, nodes, setup.multihost, harness.postmaster_pid)
            load_end = _feed_and_sample(ctx, size, setup, tasks, runners, sampler, result)
            result["load_end_s"] = load_end
            final = sampler.rows[-1] if sampler.rows else None
            codes = [harness.stop(r, timeout=60.0) for r in runners]
            result["exit_codes"] = codes
            if any(c != 0 for c in codes) and result["error"] is None:
                result["error"] = f"an instance did not stop cleanly on SIGTERM (exit codes {codes})"
            result["log_notes"] = {f"instance {i + 1}": log_lines(r, ANOMALIES)[:20] for i, r in enumerate(runners)}
            columns = sampler.columns()
            result["samples"] = columns
            result["cpu"] = cpu_figures(columns, load_end, len(tasks))
            result["verdicts"] = compute_verdicts(columns, load_end, final, len(tasks))
            result.update(analyse(conn, tasks, size, nodes, host_ids))
            result["verdicts"]["order"] = result.pop("order")
            result["verdicts"]["lifecycle"] = result.pop("lifecycle")
        except RunnerFailed as exc:
            result["error"] = str(exc)
        finally:
            for runner in runners:
                harness.stop(runner, timeout=5)
            if conn is not None:
                conn.close()
            try:
                nodes.stop()
            except RuntimeError as exc:
                result["error"] = result["error"] or str(exc)
            harness.nodes.remove(nodes)
    result["wall_s"] = round(time.monotonic() - wall_start, 1)
    result["ok"] = result["error"] is None and bool(result.get("verdicts")) and verdicts_ok(result["verdicts"])
    return result


ANOMALIES = ("Traceback", "ERROR", "died", "respawn", "lease lost", "rejoin", "write refused")


def _feed_and_sample(ctx: Ctx, size: Size, setup: Setup, tasks: list[PlannedTask], runners: list[Runner],
                     sampler: Sampler, result: dict[str, Any]) -> float:
    """Queue the tasks at the setup's rate, sample every interval until all ended, then the idle tail.

    Returns the load window's end (seconds after the first insert): the first sample that saw every task ended.
    """
    bar = ctx.bar
    conn = sampler.conn
    n = len(tasks)
    timeout = 2.0 * n / setup.rate + 300.0
    start = time.monotonic()
    deadline = start + timeout
    next_sample = start
    inserted = 0
    done_before = bar.n
    load_end: float | None = None
    tail_until: float | None = None
    while True:
        now = time.monotonic()
        if inserted < n:
            due = min(n, math.floor((now - start) * setup.rate) + 1)
            if due > inserted:
                insert_tasks(conn, tasks[inserted:due])
                inserted = due
        if now >= next_sample:
            t = now - start
            row = sampler.take(t, inserted)
            next_sample = max(next_sample + size.interval, now + size.interval / 4)
            bar.update(done_before + row["ended"] - bar.n)
            bar.set_postfix_str(f"backlog {row['queued'] + row['running']}, pg {row['pg_total']}, "
                                f"libvirt {row['libvirt_total']}")
            if load_end is None and inserted == n and row["ended"] >= n:
                load_end = t
                tail_until = now + size.tail_s
            if tail_until is not None and now >= tail_until:
                return load_end if load_end is not None else t
            check_running(runners, when=" mid-run")
        if now > deadline and load_end is None:
            result["error"] = f"not every task ended within {timeout:.0f}s"
            return now - start
        wake = min(next_sample, now + FEED_TICK) if inserted < n else next_sample
        time.sleep(max(0.0, wake - time.monotonic()))


# -- figures ------------------------------------------------------------------------------



def analyse(conn: Any, tasks: list[PlannedTask], size: Size, nodes: lifecycle.Nodes,
            host_ids: list[int]) -> dict[str, Any]:
    """From the tables, after the daemon stopped (the nodes still up): figures and the lifecycle checks."""
    rows = measure.task_rows(conn)
    ran = [r for r in rows if r["started"] is not None and r["ended"] is not None]
    out: dict[str, Any] = {"order": measure.order_check(conn),
                           "lifecycle": lifecycle.check(conn, nodes.uris, host_ids,
                                                        lifecycle_final_states(tasks, size.vms))}
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["state"]] += 1
    out["task_states"] = dict(sorted(counts.items()))
    if ran:
        first_created = min(r["created"] for r in rows)
        first_start, last_end = min(r["started"] for r in ran), max(r["ended"] for r in ran)
        latencies = sorted((r["started"] - r["created"]) * 1000.0 for r in ran)
        out["duration_s"] = round(last_end - first_created, 2)
        out["throughput_tps"] = round(len(ran) / (last_end - first_start), 1) if last_end > first_start else None
        out["latency_ms"] = {q: round(measure.percentile(latencies, p) or 0.0, 1)
                             for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))}
        # Queue-to-start includes waiting behind the VM's own earlier tasks (per-key order); from the
        # moment a task was ready (created, and its VM's previous task ended) the wait is the scheduler's.
        ready = verdicts.ready_times(rows)
        after_ready = sorted(max(0.0, r["started"] - ready[r["id"]]) * 1000.0 for r in ran)
        out["ready_wait_ms"] = {q: round(measure.percentile(after_ready, p) or 0.0, 1)
                                for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))}
        out["latency_over_time"] = verdicts.latency_over_time(rows, first_created, buckets=12)
        out["longest_ready_waits"] = verdicts.longest_ready_waits(rows, first_created)
        ids = [w["id"] for w in out["longest_ready_waits"]]
        with conn.cursor() as cur:
            cur.execute("SELECT id, claimed_by FROM tasks WHERE id = ANY(%s)", (ids,))
            holder = dict(cur.fetchall())
        conn.rollback()
        for w in out["longest_ready_waits"]:
            w["claimed_by"] = holder.get(w["id"])
        out["action_ms"] = lifecycle.action_durations(ran)
    return out


# -- the whole soak --------------------------------------------------------------------------------------


def run_soak(args: argparse.Namespace, size: Size) -> dict[str, Any]:
    from tqdm import tqdm

    setups = [s for s in size.setups if args.only in (None, s.name)]
    if args.rate:
        setups = [replace(s, rate=args.rate) for s in setups]
    tasks = generate(workload_for(size, setups[0].rate), args.seed)
    overrides = list(args.set or [])
    started_at = datetime.now(UTC)
    wall_start = time.monotonic()
    runs: list[dict[str, Any]] = []
    with Harness("taskomatic-soak-", args.keep_work_dir, announce="soak work directory") as harness:
        machine = harness.machine
        with tqdm(total=len(tasks) * len(setups), unit="task", dynamic_ncols=True, disable=args.no_progress,
                  file=sys.stderr) as bar:
            ctx = Ctx(harness, overrides, bar)
            for index, setup in enumerate(setups, start=1):
                bar.set_description(f"soak {setup.name}")
                result = run_setup(ctx, size, setup, tasks, index)
                runs.append(result)
                bar.write(one_line(result))
    actions: dict[str, int] = defaultdict(int)
    for task in tasks:
        actions[task.action] += 1
    return {
        "kind": "soak",
        "schema": SCHEMA_VERSION,
        "size": size.name,
        "seed": args.seed,
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - wall_start, 1),
        "machine": machine,
        "workload": {"tasks": size.tasks, "vms": size.vms, "nodes": lifecycle.NODES,
                     "description": f"{size.tasks} VM lifecycle tasks over {size.vms} VMs (uniform), on "
                                    f"{lifecycle.NODES} libvirt test nodes, queued at a steady rate in "
                                    f"workload order (one INSERT every {FEED_TICK:g} s)",
                     "actions": dict(sorted(actions.items()))},
        "settings": {"command": " ".join(["python -m bench.soak", *sys.argv[1:]]), "overrides": overrides,
                     "daemon_config": daemon_config(overrides), "interval_s": size.interval,
                     "tail_s": size.tail_s, "setups": [asdict(s) for s in setups],
                     "tolerances": {"memory_rel": verdicts.REL_TOLERANCE,
                                    "memory_abs_kb": verdicts.ABS_TOLERANCE_KB,
                                    "min_samples_per_third": verdicts.MIN_SAMPLES_PER_THIRD}},
        "runs": runs,
        "ok": bool(runs) and all(r["ok"] for r in runs),
    }


def one_line(r: dict[str, Any]) -> str:
    if r.get("throughput_tps") is None:
        return f"  {r['setup']}: FAILED: {(r.get('error') or '?').splitlines()[0]}"
    v = r["verdicts"]
    failed = [name for name, ok in verdict_flags(v).items() if not ok]
    error = f"  ERROR: {r['error'].splitlines()[0]}" if r.get("error") else ""
    return (f"  {r['setup']}: {r['tasks']} tasks in {r['duration_s']:.0f} s, {r['throughput_tps']:.0f} tasks/s; "
            + ("verdicts ok" if not failed else f"VERDICTS FAILED: {', '.join(failed)}") + error)


def results_dir(out: Path | None, stamp: str) -> Path:
    return out if out is not None else RESULTS_DIR / f"soak-{stamp}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--full", dest="size", action="store_const", const="full",
                       help="100,000 tasks over 5,000 VMs per configuration (the default)")
    which.add_argument("--quick", dest="size", action="store_const", const="quick",
                       help="10,000 tasks over 500 VMs per configuration")
    which.add_argument("--smoke", dest="size", action="store_const", const="smoke",
                       help="CI size: 600 tasks over 60 VMs; 2 shards, and 2 multihost instances of 1 shard")
    parser.add_argument("--only", choices=["standalone", "multihost"], help="run one configuration")
    parser.add_argument("--rate", type=float, help="tasks queued per second (default: the size's, per setup)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/soak-<stamp>)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="a daemon setting for every instance (as taskomatic --set)")
    parser.add_argument("--no-plots", action="store_true", help="JSON and Markdown only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the /tmp work directory (daemon logs)")
    parser.set_defaults(size="full")
    args = parser.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    check_overrides(parser, args.set)
    size = SIZES[args.size]
    out = results_dir(args.out, datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        results = run_soak(args, size)
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted; everything the soak started is stopped", file=sys.stderr)
        return 130
    from bench import soak_report

    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(results, separators=(",", ":")) + "\n")
    written = soak_report.write(results, out, plots=not args.no_plots)
    print(soak_report.summary(results))
    print(f"\nsoak ({size.name}) took {results['wall_s']:.0f} s; wrote {out / 'soak.json'}"
          + "".join(f", {p.name}" for p in written))
    if not results["ok"]:
        print("verdicts failed (see the JSON: runs[].verdicts, runs[].error)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

