"""Run the benchmark suite: ``python -m bench.run --quick`` (under 5 minutes), ``--full``, ``--smoke``.

One private PostgreSQL (EmbeddedPostgres, ``bench/harness.py``) for the whole
suite; every run gets a fresh database copied from a migrated template. A run is one workload through
one runner (the taskomatic daemon with N shards, or a baseline from
``bench/baselines.py``): start the runner, wait for READY, snapshot CPU,
queue the tasks (one INSERT for a burst, or at a steady rate), wait until
every task has ended, snapshot CPU and peak RSS, stop the runner (SIGTERM,
then SIGKILL to its group), and read every other figure from the tasks table (``bench/run_figures.py``).
Results go to ``bench/results/<stamp>-<suite>/``: results.json, report.md and
the plots (``bench/report.py``, which can also re-render a results.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench import lifecycle, measure
from bench.commit_probe import CommitProbe, chain_bound
from bench.harness import (
    RESULTS_DIR,
    CpuWindow,
    Harness,
    Interrupted,
    check_overrides,
    daemon_config,
    insert_tasks,
    unfinished,
)
from bench.run_figures import add_ratios, analyse
from bench.runners import ROUTINGS, Runner, RunnerFailed, RunnerSpec
from bench.workloads import PlannedTask, Workload, generate, lifecycle_final_states, work_stats

SCHEMA_VERSION = 1
PROGRESS_INTERVAL = 0.2  # seconds between progress polls of the tasks table
STEADY_TICK = 0.005  # seconds between steady-arrival inserts
FOREIGN_LOAD_WARN = 0.10  # share of the machine used by other processes that makes a run suspect


@dataclass(frozen=True)
class Entry:
    workload: Workload
    runners: tuple[RunnerSpec, ...]


# Which routings a suite compares when --routing is not given: both side by side, but one in the
# CI smoke run to keep it short (the daemon's default).
DEFAULT_ROUTINGS = {"smoke": ("pinned",), "quick": ROUTINGS, "full": ROUTINGS}


def _taskomatic(shards: list[int], routings: tuple[str, ...]) -> tuple[RunnerSpec, ...]:
    """For each shard count, one daemon run per routing, side by side (pinned, then hash)."""
    return tuple(RunnerSpec("taskomatic", n, routing) for n in shards for routing in routings)


def _runners(shards: list[int], pool: list[int], routings: tuple[str, ...]) -> tuple[RunnerSpec, ...]:
    return (RunnerSpec("original", 1), *(RunnerSpec("pool", n) for n in pool), *_taskomatic(shards, routings))


def _daemon_only(shards: list[int], routings: tuple[str, ...]) -> tuple[RunnerSpec, ...]:
    """The lifecycle workloads: real VM actions, which the baselines (noop/sleep only) cannot run."""
    return _taskomatic(shards, routings)


def suite(name: str, routings: tuple[str, ...] | None = None) -> list[Entry]:
    """The workloads and runners of a suite (see bench/README.md for why these sizes).

    ``routings``: the daemon routings the throughput and makespan workloads run with, side by side
    (default ``DEFAULT_ROUTINGS[name]``); the steady and lifecycle workloads run with the first only.
    """
    if name not in DEFAULT_ROUTINGS:
        raise ValueError(f"unknown suite {name!r}")
    both = routings or DEFAULT_ROUTINGS[name]
    one = both[:1]
    return _entries(name, both, one)


def _entries(name: str, both: tuple[str, ...], one: tuple[str, ...]) -> list[Entry]:
    if name == "smoke":
        return [Entry(Workload("noop-uniform", 200, 20), _runners([1, 2], [2], both)),
                Entry(Workload("lifecycle-uniform", 60, 10, latency="lifecycle"), _daemon_only([2], one))]
    if name == "quick":
        scale, default = [1, 2, 4], [4]
        return [
            Entry(Workload("noop-uniform", 4000, 400), _runners(scale, scale, both)),
            Entry(Workload("noop-zipf", 4000, 400, "zipf"), _runners(default, default, both)),
            Entry(Workload("sleep20-uniform", 400, 100, latency="fixed", base_ms=20),
                  _runners(default, default, both)),
            Entry(Workload("sleep20-zipf", 400, 100, "zipf", latency="fixed", base_ms=20),
                  _runners(default, default, both)),
            Entry(Workload("heavy-uniform", 200, 100, latency="heavy", base_ms=20), _runners(default, default, both)),
            Entry(Workload("heavy-zipf", 200, 100, "zipf", latency="heavy", base_ms=20),
                  _runners(default, default, both)),
            Entry(Workload("steady-idle", 100, 100, arrival="steady", rate=25), _runners(default, default, one)),
            Entry(Workload("steady-loaded", 1500, 400, arrival="steady", rate=300), _runners(default, default, one)),
            Entry(Workload("lifecycle-uniform", 1000, 100, latency="lifecycle"), _daemon_only([1, 4], one)),
            Entry(Workload("lifecycle-zipf", 1000, 100, "zipf", latency="lifecycle"), _daemon_only(default, one)),
        ]
    if name == "full":
        scale, default = [1, 2, 4, 8, 16], [4, 16]
        return [
            Entry(Workload("noop-uniform", 20000, 500), _runners(scale, scale, both)),
            Entry(Workload("noop-zipf", 20000, 500, "zipf"), _runners(scale, [4], both)),
            Entry(Workload("sleep20-uniform", 2000, 500, latency="fixed", base_ms=20),
                  _runners(default, default, both)),
            Entry(Workload("sleep20-zipf", 2000, 500, "zipf", latency="fixed", base_ms=20),
                  _runners(default, default, both)),
            Entry(Workload("heavy-uniform", 1000, 500, latency="heavy", base_ms=20),
                  _runners(default, default, both)),
            Entry(Workload("heavy-zipf", 1000, 500, "zipf", latency="heavy", base_ms=20),
                  _runners(default, default, both)),
            Entry(Workload("steady-idle", 300, 300, arrival="steady", rate=25), _runners([4], [4], one)),
            Entry(Workload("steady-loaded", 6000, 500, arrival="steady", rate=500), _runners([4], [4], one)),
            Entry(Workload("lifecycle-uniform", 5000, 500, latency="lifecycle"), _daemon_only([1, 2, 4, 8, 16], one)),
            Entry(Workload("lifecycle-zipf", 5000, 500, "zipf", latency="lifecycle"), _daemon_only(default, one)),
        ]
    raise ValueError(f"unknown suite {name!r}")


@dataclass
class Context:
    harness: Harness
    seed: int
    baseline_poll: float
    daemon_settings: list[str]
    run_timeout: float | None
    bar: Any


def _role(leader: int, kind: str) -> Callable[[int, str], str]:
    def role(pid: int, title: str) -> str:
        if kind == "postgres":
            if pid == leader:
                return "postmaster"
            name = title.removeprefix("postgres: ")
            # "taskomatic bench_x [local] idle" is a client backend; the rest name themselves.
            return "backend" if "[local]" in name else name.strip()
        if pid == leader:
            return "supervisor" if kind == "taskomatic" else "main"
        if title.startswith("taskomatic: ") or "resource_tracker" in title:
            return measure.daemon_role(title, is_leader=False)
        return "worker" if kind == "pool" else title[:40]

    return role


LIFECYCLE_TASK_S = 0.2  # a generous serial estimate of one lifecycle task, for the run's timeout


def _timeout_for(workload: Workload, tasks: list[PlannedTask]) -> float:
    serial = sum(t.ms for t in tasks) / 1000.0
    if workload.work_measured:
        serial += LIFECYCLE_TASK_S * len(tasks)
    arrival = workload.tasks / workload.rate if workload.arrival == "steady" else 0.0
    return 60.0 + arrival + 3.0 * serial + workload.tasks / 50.0


def execute_run(ctx: Context, workload: Workload, tasks: list[PlannedTask], spec: RunnerSpec,
                index: int) -> dict[str, Any]:
    result: dict[str, Any] = {"workload": workload.name, "runner": spec.kind, "parallelism": spec.parallelism,
                              "label": spec.label, "complete": False, "error": None}
    if spec.routing:
        result["routing"] = spec.routing
    if workload.needs_libvirt and spec.is_baseline:
        raise ValueError(f"{workload.name}: {spec.label} cannot run real VM actions (it knows noop and sleep only)")
    routed = f"-{spec.routing}" if spec.routing else ""
    run_dir = ctx.harness.base / f"run{index:02d}-{workload.name}-{spec.kind}{spec.parallelism}{routed}"
    timeout = ctx.run_timeout or _timeout_for(workload, tasks)
    with ctx.harness.fresh_database() as dsn:
        nodes = lifecycle.Nodes(lifecycle.short_dir(ctx.harness.base, index)) if workload.needs_libvirt else None
        try:
            settings = ctx.daemon_settings
            host_ids: list[int] = []
            if nodes is not None:
                try:
                    nodes.start()
                except Exception as exc:
                    result["error"] = f"libvirt nodes did not start: {exc}"
                    result.update(analyse(_connect(dsn), workload, tasks, spec, close=True))
                    return result
                host_ids = lifecycle.seed_database(dsn, nodes.uris, workload.keys)
                settings = [*nodes.daemon_settings(), *ctx.daemon_settings]  # --set given to the bench wins
            _run_one(ctx, workload, tasks, spec, run_dir, dsn, settings, timeout, nodes, host_ids, result)
        finally:
            if nodes is not None:
                try:
                    nodes.stop()
                except RuntimeError as exc:
                    result["error"] = result["error"] or str(exc)
                    result["complete"] = False
    return result


def _connect(dsn: str) -> Any:
    return psycopg2.connect(dsn, application_name="bench")


def _run_one(ctx: Context, workload: Workload, tasks: list[PlannedTask], spec: RunnerSpec, run_dir: Path,
             dsn: str, settings: list[str], timeout: float, nodes: lifecycle.Nodes | None, host_ids: list[int],
             result: dict[str, Any]) -> None:
    runner = ctx.harness.start(spec, dsn, run_dir, settings, ctx.baseline_poll)
    conn = _connect(dsn)
    probe: CommitProbe | None = None
    try:
        result["ready_s"] = round(runner.wait_ready(), 3)
        postmaster = ctx.harness.local_postmaster_pid  # None on a server given by --dsn: not measured
        # No-op tasks on Zipf keys end when the hottest key's chain does: time one commit meanwhile.
        zipf_noop = workload.latency == "noop" and workload.key_distribution == "zipf"
        probe = CommitProbe(dsn) if zipf_noop and spec.keeps_order else None
        window = CpuWindow([runner.pid], postmaster, nodes.pids if nodes else None)
        with probe or nullcontext():
            ended = _feed_and_wait(ctx, conn, workload, tasks, runner, timeout)
        if probe is not None:
            result["commit_probe"] = probe.figures
        cpu = window.close()
        runner_cpu, pg_cpu, nodes_cpu = cpu.groups_s[0], cpu.postgres_s, cpu.nodes_s
        result["wall_s"] = round(cpu.wall_s, 3)
        result["rss"] = {
            "runner": measure.peak_rss(cpu.group_members[0], _role(runner.pid, spec.kind)),
            "postgres": measure.peak_rss(cpu.postgres_members, _role(postmaster or -1, "postgres")),
        }
        result["cpu"] = {
            "runner_s": round(runner_cpu, 3), "postgres_s": round(pg_cpu, 3),
            "runner_s_per_1k": round(runner_cpu / workload.tasks * 1000, 4),
            "postgres_s_per_1k": round(pg_cpu / workload.tasks * 1000, 4),
            "bench_s": round(cpu.bench_s, 3),
            "machine_busy_s": round(cpu.machine_busy_s, 3),
            # Whatever else ran on the machine meanwhile: when this is a large share of
            # the machine, the run's figures are disturbed by foreign load.
            "other_s": round(cpu.other_s, 3),
            "other_share": cpu.other_share,
        }
        if nodes is not None:
            # The libvirt nodes' daemons (their process groups): the test driver's side of the work.
            result["cpu"]["nodes_s"] = round(nodes_cpu, 3)
            result["cpu"]["nodes_s_per_1k"] = round(nodes_cpu / workload.tasks * 1000, 4)
        if not ended:
            result["error"] = f"not every task ended within {timeout:.0f}s"
    except RunnerFailed as exc:
        result["error"] = str(exc)
    finally:
        code = ctx.harness.stop(runner)
        result["runner_exit_code"] = code
    if result["error"] is None and code != 0:
        result["error"] = f"{spec.label} exited with {code} on SIGTERM:\n{runner.log_tail()}"
    result.update(analyse(conn, workload, tasks, spec, commits=probe.timed() if probe is not None else ()))
    if "commit_probe" in result:
        result["chain_bound"] = chain_bound(work_stats(tasks).heaviest_key_tasks, result["commit_probe"]["p50_ms"],
                                            workload.tasks, result.get("span_s"))
    result["complete"] = result["error"] is None and result["tasks"]["finished"] == workload.tasks
    if nodes is not None:
        # With the daemon stopped and the nodes still up: what it left in the tables and on the nodes.
        result["lifecycle"] = lifecycle.check(conn, nodes.uris, host_ids,
                                              lifecycle_final_states(tasks, workload.keys))
    conn.close()


def _feed_and_wait(ctx: Context, conn: Any, workload: Workload, tasks: list[PlannedTask], runner: Runner,
                   timeout: float) -> bool:
    """Queue the tasks (burst or steady) and wait until all have ended; False on timeout."""
    bar = ctx.bar
    start = time.monotonic()
    deadline = start + timeout
    inserted = 0
    if workload.arrival == "burst":
        insert_tasks(conn, tasks)
        inserted = len(tasks)
    done_before = bar.n
    next_poll = time.monotonic()
    while True:
        now = time.monotonic()
        if inserted < len(tasks):
            due = min(len(tasks), math.floor((now - start) * workload.rate) + 1)
            if due > inserted:
                insert_tasks(conn, tasks[inserted:due])
                inserted = due
        if now >= next_poll:
            next_poll = now + PROGRESS_INTERVAL
            ended = inserted - unfinished(conn)
            bar.update(done_before + ended - bar.n)
            if inserted == len(tasks) and ended >= len(tasks):
                return True
            if runner.process.poll() is not None:
                raise RunnerFailed(f"{runner.spec.label} exited with {runner.process.returncode} mid-run:\n"
                                   f"{runner.log_tail()}")
        if now > deadline:
            return False
        time.sleep(STEADY_TICK if inserted < len(tasks) else PROGRESS_INTERVAL / 4)


# -- the suite ----------------------------------------------------------------------------


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    entries = suite(args.suite, args.routing)
    if args.only:
        entries = [e for e in entries if e.workload.name in args.only]
    plans = {e.workload.name: generate(e.workload, args.seed) for e in entries}
    started_at = datetime.now(UTC)
    wall_start = time.monotonic()
    runs: list[dict[str, Any]] = []
    with Harness("taskomatic-bench-", args.keep_work_dir, announce="bench work directory",
                 server_dsn=args.dsn) as harness:
        machine = harness.machine
        total = sum(e.workload.tasks * len(e.runners) for e in entries)
        with tqdm(total=total, unit="task", dynamic_ncols=True, disable=args.no_progress,
                  file=sys.stderr) as bar:
            ctx = Context(harness, args.seed, args.baseline_poll, args.set or [], args.run_timeout, bar)
            index = 0
            for entry in entries:
                for spec in entry.runners:
                    index += 1
                    bar.set_description(f"{entry.workload.name}: {spec.label}")
                    result = execute_run(ctx, entry.workload, plans[entry.workload.name], spec, index)
                    runs.append(result)
                    bar.write(_one_line(result))
    add_ratios(runs)
    workloads = []
    for entry in entries:
        plan = plans[entry.workload.name]
        stats = work_stats(plan)
        described = {**entry.workload.to_json(), "total_work_s": round(stats.total_s, 4),
                     "heaviest_key_work_s": round(stats.heaviest_key_s, 4),
                     "heaviest_key_tasks": stats.heaviest_key_tasks, "distinct_keys": stats.distinct_keys,
                     "runners": [spec.label for spec in entry.runners]}
        if entry.workload.work_measured:
            # Not known before the run: each run has its measured_work.
            described.update(total_work_s=None, heaviest_key_work_s=None, work_measured=True,
                             actions=dict(sorted(_count(t.action for t in plan).items())),
                             baselines="not run: the original design and the SKIP LOCKED pool know only the "
                                       "bench's noop and sleep actions")
        workloads.append(described)
    daemon_runs = [r for r in runs if r["runner"] == "taskomatic"]
    lifecycle_runs = [r for r in runs if "lifecycle" in r]
    ordered_runs = [r for r in runs if r["runner"] != "pool"]
    return {
        "schema": SCHEMA_VERSION,
        "suite": args.suite,
        "seed": args.seed,
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - wall_start, 1),
        "machine": machine,
        "postgresql_server": "private (EmbeddedPostgres)" if args.dsn is None else
                             "given by --dsn: the bench's own databases on it; its CPU and memory not measured",
        "settings": {"baseline_poll_s": args.baseline_poll, "daemon_settings": args.set or [],
                     "routings": list(args.routing or DEFAULT_ROUTINGS[args.suite]),
                     "daemon_config": daemon_config(args.set or []),
                     "progress_poll_s": PROGRESS_INTERVAL, "command": " ".join(sys.argv),
                     "lifecycle_daemon_settings": ["save_dir=<the run's node directory>/save (mode 0777)"]},
        "workloads": workloads,
        "runs": runs,
        "checks": {
            "all_runs_complete": all(r["complete"] for r in runs),
            "all_tasks_finished": all(r.get("tasks", {}).get("finished") == r.get("tasks", {}).get("expected")
                                      for r in runs),
            "taskomatic_order_ok": all(r.get("order", {}).get("ok") for r in daemon_runs),
            "ordered_runners_order_ok": all(r.get("order", {}).get("ok") for r in ordered_runs),
            # Lifecycle runs: every task finished once, VM rows agree with the plan and with libvirt.
            "lifecycle_consistent": all(r["lifecycle"]["ok"] for r in lifecycle_runs),
        },
    }


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for v in values:
        counts[v] += 1
    return dict(counts)


def _one_line(r: dict[str, Any]) -> str:
    if r.get("error") and "latency_ms" not in r:
        first = r["error"].splitlines()[0]
        return f"  {r['workload']:<16} {r['label']:<34} FAILED: {first}"
    lat = r.get("latency_ms") or {}
    ms = f" makespan/LB {r['makespan_ratio']:.2f}" if r.get("makespan_ratio") else ""
    share = (r.get("chain_bound") or {}).get("share_of_bound")
    if share is not None:
        ms += f" chain bound {share:.0%} (commit {r['commit_probe']['p50_ms']:.2f} ms)"
        links = r.get("chain_links") or {}
        if (links.get("shared") or {}).get("p50_ms") and (links.get("alone") or {}).get("p50_ms"):
            ms += (f", links p50 {links['shared']['p50_ms']:.2f} ms beside other work, "
                   f"{links['alone']['p50_ms']:.2f} ms alone")
        if links.get("share_at_mean_commits") is not None:
            ms += f"; {links['share_at_mean_commits']:.0%} of it at mean commits"
    other = (r.get("cpu") or {}).get("other_share")
    foreign = f"  (other load {other:.0%} of the machine)" if other and other >= FOREIGN_LOAD_WARN else ""
    failed = f"  FAILED: {r['error'].splitlines()[0]}" if r.get("error") else ""
    return (f"  {r['workload']:<16} {r['label']:<34} {r.get('throughput_tps') or 0:>8.0f} tasks/s  "
            f"p50 {lat.get('p50', 0):.1f} p99 {lat.get('p99', 0):.1f} ms{ms}  order "
            f"{_order_text(r)}{foreign}{failed}")


def _order_text(r: dict[str, Any]) -> str:
    order = r.get("order") or {}
    if order.get("ok"):
        return "ok"
    if r["runner"] == "pool":
        return f"none promised ({order.get('violations')} out of order)"
    return f"VIOLATED ({order.get('violations')})"


def main(argv: list[str] | None = None, prog: str = "python -m bench.run") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="suite", action="store_const", const="quick",
                       help="the quick suite (default; under 5 minutes on 2 cores)")
    which.add_argument("--full", dest="suite", action="store_const", const="full", help="the full suite")
    which.add_argument("--smoke", dest="suite", action="store_const", const="smoke",
                       help="a tiny run for CI: 200 noop tasks, 20 keys, shards 1 and 2, both baselines; "
                            "60 lifecycle tasks on 10 VMs, 2 shards")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument("--only", action="append", metavar="WORKLOAD", help="run only this workload (repeatable)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<stamp>-<suite>)")
    parser.add_argument("--no-plots", action="store_true", help="JSON and Markdown only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--baseline-poll", type=float, default=1.0,
                        help="seconds an idle baseline waits before polling again (default 1.0)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="a daemon setting for every taskomatic run (passed as --set)")
    parser.add_argument("--routing", choices=(*ROUTINGS, "both"),
                        help="the daemon routing(s) the throughput and makespan workloads run with, side by side: "
                             "pinned, hash or both (default: both in --quick and --full, pinned in --smoke); "
                             "the steady and lifecycle workloads run with the first (pinned when both)")
    parser.add_argument("--run-timeout", type=float, help="seconds one run may take (default: from the workload)")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the /tmp work directory (runner logs)")
    parser.add_argument("--dsn", help="a PostgreSQL server to use instead of a private one: the bench creates "
                                      "databases of its own there (unique names) and drops them; the database "
                                      "the dsn names is only connected to")
    parser.set_defaults(suite="quick")
    args = parser.parse_args(argv)
    if args.only:
        known = {e.workload.name for e in suite(args.suite)}
        unknown = set(args.only) - known
        if unknown:
            parser.error(f"unknown workload(s) {', '.join(sorted(unknown))}; {args.suite} has {', '.join(known)}")
    check_overrides(parser, args.set)
    if any(s.split("=", 1)[0].strip() == "routing" for s in args.set or []):
        parser.error("--set routing=...: use --routing (each run is labelled with its routing)")
    args.routing = ROUTINGS if args.routing == "both" else (args.routing,) if args.routing else None
    out = args.out or RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{args.suite}"
    try:
        results = run_suite(args)
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted; everything the bench started is stopped", file=sys.stderr)
        return 130
    except psycopg2.Error as exc:  # --dsn: unreachable, or the role may not create databases
        where = "the server given by --dsn" if args.dsn else "the private PostgreSQL"
        print(f"{parser.prog}: {where}: {str(exc).strip()} (the bench creates and drops databases of its "
              "own there: its role needs CREATEDB)", file=sys.stderr)
        return 1
    from bench import report

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    written = report.write(results, out, plots=not args.no_plots)
    print(report.summary_table(results))
    print(f"\nsuite {results['suite']} took {results['wall_s']:.0f} s; wrote {out / 'results.json'}"
          + "".join(f", {p.name}" for p in written))
    checks = results["checks"]
    if not (checks["all_runs_complete"] and checks["taskomatic_order_ok"] and checks["lifecycle_consistent"]):
        print(f"checks failed: {checks}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
