"""Run the benchmark suite: ``python -m bench.run --quick`` (under 5 minutes), ``--full``, ``--smoke``.

One private PostgreSQL (EmbeddedPostgres) for the whole suite; every run gets a
fresh database copied from a migrated template. A run is one workload through
one runner (the taskomatic daemon with N shards, or a baseline from
``bench/baselines.py``): start the runner, wait for READY, snapshot CPU,
queue the tasks (one INSERT for a burst, or at a steady rate), wait until
every task has ended, snapshot CPU and peak RSS, stop the runner (SIGTERM,
then SIGKILL to its group), and read every other figure from the tasks table.
Results go to ``bench/results/<stamp>-<suite>/``: results.json, report.md and
the plots (``bench/report.py``, which can also re-render a results.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from bench import lifecycle, measure
from bench.plugin import write_dist_info
from bench.runners import REPO, Runner, RunnerFailed, RunnerSpec
from bench.workloads import (
    PlannedTask,
    Workload,
    generate,
    lifecycle_final_states,
    lower_bound,
    measured_work_stats,
    work_stats,
)

RESULTS_DIR = REPO / "bench" / "results"
TEMPLATE_DB = "bench_template"
SCHEMA_VERSION = 1
PROGRESS_INTERVAL = 0.2  # seconds between progress polls of the tasks table
STEADY_TICK = 0.005  # seconds between steady-arrival inserts
FOREIGN_LOAD_WARN = 0.10  # share of the machine used by other processes that makes a run suspect


@dataclass(frozen=True)
class Entry:
    workload: Workload
    runners: tuple[RunnerSpec, ...]


def _runners(shards: list[int], pool: list[int]) -> tuple[RunnerSpec, ...]:
    return (RunnerSpec("original", 1), *(RunnerSpec("pool", n) for n in pool),
            *(RunnerSpec("taskomatic", n) for n in shards))


def _daemon_only(shards: list[int]) -> tuple[RunnerSpec, ...]:
    """The lifecycle workloads: real VM actions, which the baselines (noop/sleep only) cannot run."""
    return tuple(RunnerSpec("taskomatic", n) for n in shards)


def suite(name: str) -> list[Entry]:
    """The workloads and runners of a suite (see bench/README.md for why these sizes)."""
    if name == "smoke":
        return [Entry(Workload("noop-uniform", 200, 20), _runners([1, 2], [2])),
                Entry(Workload("lifecycle-uniform", 60, 10, latency="lifecycle"), _daemon_only([2]))]
    if name == "quick":
        scale, default = [1, 2, 4], [4]
        return [
            Entry(Workload("noop-uniform", 4000, 400), _runners(scale, scale)),
            Entry(Workload("noop-zipf", 4000, 400, "zipf"), _runners(default, default)),
            Entry(Workload("sleep20-uniform", 400, 100, latency="fixed", base_ms=20), _runners(default, default)),
            Entry(Workload("sleep20-zipf", 400, 100, "zipf", latency="fixed", base_ms=20),
                  _runners(default, default)),
            Entry(Workload("heavy-uniform", 200, 100, latency="heavy", base_ms=20), _runners(default, default)),
            Entry(Workload("steady-idle", 100, 100, arrival="steady", rate=25), _runners(default, default)),
            Entry(Workload("steady-loaded", 1500, 400, arrival="steady", rate=300), _runners(default, default)),
            Entry(Workload("lifecycle-uniform", 1000, 100, latency="lifecycle"), _daemon_only([1, 4])),
            Entry(Workload("lifecycle-zipf", 1000, 100, "zipf", latency="lifecycle"), _daemon_only(default)),
        ]
    if name == "full":
        scale, default = [1, 2, 4, 8, 16], [4, 16]
        return [
            Entry(Workload("noop-uniform", 20000, 500), _runners(scale, scale)),
            Entry(Workload("noop-zipf", 20000, 500, "zipf"), _runners(scale, [4])),
            Entry(Workload("sleep20-uniform", 2000, 500, latency="fixed", base_ms=20), _runners(default, default)),
            Entry(Workload("sleep20-zipf", 2000, 500, "zipf", latency="fixed", base_ms=20),
                  _runners(default, default)),
            Entry(Workload("heavy-uniform", 1000, 500, latency="heavy", base_ms=20), _runners(default, default)),
            Entry(Workload("heavy-zipf", 1000, 500, "zipf", latency="heavy", base_ms=20),
                  _runners(default, default)),
            Entry(Workload("steady-idle", 300, 300, arrival="steady", rate=25), _runners([4], [4])),
            Entry(Workload("steady-loaded", 6000, 500, arrival="steady", rate=500), _runners([4], [4])),
            Entry(Workload("lifecycle-uniform", 5000, 500, latency="lifecycle"), _daemon_only([1, 2, 4, 8, 16])),
            Entry(Workload("lifecycle-zipf", 5000, 500, "zipf", latency="lifecycle"), _daemon_only(default)),
        ]
    raise ValueError(f"unknown suite {name!r}")


# -- the machine ---------------------------------------------------------------------


def _first(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip() if ":" in line else line.split("=", 1)[1].strip()
    except OSError:
        return None
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_description(conn: Any) -> dict[str, Any]:
    import psycopg2 as pg

    from taskomatic import __version__

    mem = _first("/proc/meminfo", "MemTotal")
    with conn.cursor() as cur:
        settings = {}
        for setting in ("server_version", "fsync", "synchronous_commit", "shared_buffers", "max_connections"):
            cur.execute(f"SHOW {setting}")
            settings[setting] = cur.fetchone()[0]
    conn.rollback()
    os_name = _first("/etc/os-release", "PRETTY_NAME=")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_model": _first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_kb": int(mem.split()[0]) if mem else None,
        "kernel": platform.release(),
        "os": os_name.strip('"') if os_name else None,
        "python": platform.python_version(),
        "postgresql": settings.pop("server_version"),
        "postgresql_settings": settings,
        "psycopg2": pg.__version__.split()[0],
        "taskomatic_version": __version__,
        "commit": _git("rev-parse", "HEAD"),
        "commit_dirty": bool(status) if status is not None else None,
    }


# -- the database ----------------------------------------------------------------------


def _dsn_for(server_dsn: str, dbname: str) -> str:
    return server_dsn.replace("dbname=taskomatic", f"dbname={dbname}")


def _admin(server_dsn: str) -> Any:
    conn = psycopg2.connect(_dsn_for(server_dsn, "postgres"))
    conn.autocommit = True
    return conn


def make_template(server_dsn: str) -> None:
    from taskomatic.db import migrate

    admin = _admin(server_dsn)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        cur.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    admin.close()
    conn = psycopg2.connect(_dsn_for(server_dsn, TEMPLATE_DB))
    migrate.upgrade(conn)
    conn.close()


@contextmanager
def fresh_database(server_dsn: str) -> Iterator[str]:
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = _admin(server_dsn)
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
        yield _dsn_for(server_dsn, name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


INSERT_SQL = """
INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by)
SELECT 'Vm', u.key, u.action, u.args::jsonb, 'bench'
FROM unnest(%s::bigint[], %s::text[], %s::text[]) WITH ORDINALITY AS u(key, action, args, n)
ORDER BY u.n
"""


def insert_tasks(conn: Any, tasks: list[PlannedTask]) -> None:
    """Queue tasks in one statement (one transaction, one NOTIFY), in list order."""
    with conn.cursor() as cur:
        cur.execute(INSERT_SQL, ([t.key for t in tasks], [t.action for t in tasks], [t.args_json for t in tasks]))
    conn.commit()


def unfinished(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM tasks WHERE state IN ('queued', 'running')")
        value = int(cur.fetchone()[0])
    conn.commit()
    return value


# -- one run ----------------------------------------------------------------------------


class Interrupted(Exception):
    """SIGTERM to the bench: clean up as on Ctrl-C."""


@dataclass
class Context:
    server_dsn: str
    postmaster_pid: int
    work_dir: Path
    plugin_path: Path
    seed: int
    baseline_poll: float
    daemon_settings: list[str]
    run_timeout: float | None
    bar: Any
    on_runner: Callable[[Runner | None], None]


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
    if workload.needs_libvirt and spec.is_baseline:
        raise ValueError(f"{workload.name}: {spec.label} cannot run real VM actions (it knows noop and sleep only)")
    run_dir = ctx.work_dir / f"run{index:02d}-{workload.name}-{spec.kind}{spec.parallelism}"
    timeout = ctx.run_timeout or _timeout_for(workload, tasks)
    with fresh_database(ctx.server_dsn) as dsn:
        nodes = lifecycle.Nodes(lifecycle.short_dir(ctx.work_dir, index)) if workload.needs_libvirt else None
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
    runner = Runner(spec, dsn, run_dir, ctx.plugin_path, ctx.baseline_poll, settings)
    ctx.on_runner(runner)
    conn = _connect(dsn)
    try:
        result["ready_s"] = round(runner.wait_ready(), 3)
        stats = measure.all_stats()
        runner_before = measure.cpu_snapshot(measure.group_members(runner.pid, stats))
        pg_before = measure.cpu_snapshot(measure.tree_members(ctx.postmaster_pid, stats))
        nodes_before = measure.cpu_snapshot(lifecycle.node_cpu_members(nodes.pids, stats)) if nodes else {}
        machine_before, self_before = measure.machine_busy_seconds(), measure.self_cpu_seconds()
        wall_start = time.monotonic()
        ended = _feed_and_wait(ctx, conn, workload, tasks, runner, timeout)
        wall = time.monotonic() - wall_start
        machine_busy = measure.machine_busy_seconds() - machine_before
        bench_cpu = measure.self_cpu_seconds() - self_before
        result["wall_s"] = round(wall, 3)
        stats = measure.all_stats()
        runner_members = measure.group_members(runner.pid, stats)
        pg_members = measure.tree_members(ctx.postmaster_pid, stats)
        runner_cpu = measure.cpu_seconds(runner_before, measure.cpu_snapshot(runner_members))
        pg_cpu = measure.cpu_seconds(pg_before, measure.cpu_snapshot(pg_members))
        nodes_cpu = (measure.cpu_seconds(nodes_before, measure.cpu_snapshot(lifecycle.node_cpu_members(nodes.pids,
                                                                                                      stats)))
                     if nodes else 0.0)
        result["rss"] = {
            "runner": measure.peak_rss(runner_members, _role(runner.pid, spec.kind)),
            "postgres": measure.peak_rss(pg_members, _role(ctx.postmaster_pid, "postgres")),
        }
        other = max(0.0, machine_busy - runner_cpu - pg_cpu - nodes_cpu - bench_cpu)
        result["cpu"] = {
            "runner_s": round(runner_cpu, 3), "postgres_s": round(pg_cpu, 3),
            "runner_s_per_1k": round(runner_cpu / workload.tasks * 1000, 4),
            "postgres_s_per_1k": round(pg_cpu / workload.tasks * 1000, 4),
            "bench_s": round(bench_cpu, 3),
            "machine_busy_s": round(machine_busy, 3),
            # Whatever else ran on the machine meanwhile: when this is a large share of
            # the machine, the run's figures are disturbed by foreign load.
            "other_s": round(other, 3),
            "other_share": round(other / (wall * (os.cpu_count() or 1)), 4) if wall > 0 else None,
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
        code = runner.stop()
        ctx.on_runner(None)
        result["runner_exit_code"] = code
    if result["error"] is None and code != 0:
        result["error"] = f"{spec.label} exited with {code} on SIGTERM:\n{runner.log_tail()}"
    result.update(analyse(conn, workload, tasks, spec))
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


def analyse(conn: Any, workload: Workload, tasks: list[PlannedTask], spec: RunnerSpec,
            close: bool = False) -> dict[str, Any]:
    """Every figure that comes from the tasks table."""
    rows = measure.task_rows(conn)
    order = measure.order_check(conn)
    if close:
        conn.close()
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["state"]] += 1
    out: dict[str, Any] = {
        "tasks": {"total": len(rows), "expected": workload.tasks, "finished": counts.get("finished", 0),
                  "failed": counts.get("failed", 0),
                  "other": sum(v for k, v in counts.items() if k not in ("finished", "failed"))},
        "order": order,
    }
    ran = [r for r in rows if r["started"] is not None and r["ended"] is not None]
    if not ran:
        return out
    latencies = sorted((r["started"] - r["created"]) * 1000.0 for r in ran)
    first_start = min(r["started"] for r in ran)
    first_created = min(r["created"] for r in rows)
    last_end = max(r["ended"] for r in ran)
    span = last_end - first_start
    out["throughput_tps"] = round(len(ran) / span, 2) if span > 0 else None
    out["span_s"] = round(span, 4)
    out["latency_ms"] = {
        "p50": _round(measure.percentile(latencies, 0.50)), "p95": _round(measure.percentile(latencies, 0.95)),
        "p99": _round(measure.percentile(latencies, 0.99)), "max": _round(latencies[-1]),
        "mean": _round(sum(latencies) / len(latencies)),
    }
    out["latency_cdf_ms"] = measure.cdf_points(latencies)
    runs = [(r["ended"] - r["started"]) * 1000.0 for r in ran]
    out["run_ms_mean"] = _round(sum(runs) / len(runs))
    out["makespan_s"] = round(last_end - first_created, 4)
    if workload.work_measured:
        # Work not known in advance (real VM actions): the bound is computed from each
        # task's measured time_started -> time_ended, per key and in all.
        stats = measured_work_stats([(r["key_id"], r["ended"] - r["started"]) for r in ran])
        out["measured_work"] = {"total_s": round(stats.total_s, 4), "heaviest_key_s": round(stats.heaviest_key_s, 4),
                                "heaviest_key_tasks": stats.heaviest_key_tasks,
                                "longest_task_s": round(stats.longest_task_s, 4),
                                "distinct_keys": stats.distinct_keys}
        out["action_ms"] = lifecycle.action_durations(ran)
    else:
        stats = work_stats(tasks)
    if workload.has_work:
        bound = lower_bound(stats, spec.parallelism, keyed=spec.keeps_order)
        out["lower_bound_s"] = round(bound, 4)
        out["lower_bound_from"] = "measured durations" if workload.work_measured else "planned work"
        out["makespan_ratio"] = round((last_end - first_created) / bound, 4) if bound > 0 else None
    busy = sum(r["ended"] - r["started"] for r in ran)
    out["utilisation"] = {"pool": round(busy / (spec.parallelism * span), 4) if span > 0 else None,
                          "per_shard": None, "per_shard_note": None}
    if spec.kind == "taskomatic":
        out["utilisation"].update(_per_shard(ran, spec.parallelism, first_start, span))
        if workload.has_work:
            # The busy intervals per shard and the tasks running over time, for the timeline plot.
            out["timeline"] = measure.shard_timeline(rows, spec.parallelism)
    return out


def _per_shard(ran: list[dict[str, Any]], shards: int, first_start: float, span: float) -> dict[str, Any]:
    """Busy fraction and task count of each shard, from the slot the tasks table recorded.

    ``tasks.run_by_shard`` is the shard slot that marked each task running
    (``measure.shard_of``; a key goes to whichever shard has room, so the key
    alone does not say). A shard runs one task at a time, so no two tasks of
    one shard may overlap: if some do, the figures are kept and the note says
    so, since that is a daemon bug to look into. Rows with no slot recorded
    fall back to the old hash routing, ``router.shard_for(key)``, which is
    kept only if it is consistent (it no longer is how the daemon routes).
    """
    by_shard: dict[int, list[tuple[float, float]]] = defaultdict(list)
    from_hash = 0
    for r in ran:
        shard, recorded = measure.shard_of(r, shards)
        from_hash += not recorded
        by_shard[shard].append((r["started"], r["ended"]))
    out_of_range = sum(len(v) for i, v in by_shard.items() if not 0 <= i < shards)
    overlapping = sum(measure.overlap_count(v) for v in by_shard.values())
    if from_hash and (overlapping or out_of_range):
        return {"per_shard": None, "per_shard_note": f"not derivable: {from_hash} of {len(ran)} tasks have no "
                "tasks.run_by_shard, and attributing them by router.shard_for (the old hash routing) puts "
                "overlapping tasks on one shard"}
    per = [round(sum(e - s for s, e in by_shard.get(i, [])) / span, 4) if span > 0 else None
           for i in range(shards)]
    tasks_per = [len(by_shard.get(i, [])) for i in range(shards)]
    source = ("tasks.run_by_shard" if not from_hash else
              f"tasks.run_by_shard (router.shard_for for the {from_hash} of {len(ran)} tasks with none recorded)")
    if overlapping or out_of_range:
        verdict = (f"INCONSISTENT: {overlapping} tasks started on a shard before its previous one ended"
                   + (f", {out_of_range} name a slot outside 0..{shards - 1}" if out_of_range else "")
                   + " (a daemon bug: a shard runs one task at a time)")
    else:
        verdict = "consistent: no overlap within a shard"
    return {"per_shard": per, "tasks_per_shard": tasks_per, "per_shard_overlaps": overlapping,
            "per_shard_note": f"attributed by {source} ({verdict}); "
                              "busy = time_started..time_ended over the first start..last end window"}


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# -- ratios -------------------------------------------------------------------------------

RATIO_FIGURES = (
    ("throughput_tps", lambda r: r.get("throughput_tps")),
    ("latency_p50_ms", lambda r: (r.get("latency_ms") or {}).get("p50")),
    ("latency_p95_ms", lambda r: (r.get("latency_ms") or {}).get("p95")),
    ("latency_p99_ms", lambda r: (r.get("latency_ms") or {}).get("p99")),
    ("makespan_s", lambda r: r.get("makespan_s")),
    ("makespan_ratio", lambda r: r.get("makespan_ratio")),
    ("runner_cpu_s_per_1k", lambda r: (r.get("cpu") or {}).get("runner_s_per_1k")),
    ("postgres_cpu_s_per_1k", lambda r: (r.get("cpu") or {}).get("postgres_s_per_1k")),
)


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Each run's figures divided by the same workload's baselines of this suite run.

    vs_original: the original design. vs_pool: the SKIP LOCKED pool with as many
    workers as the run has shards/workers, else the pool with the most workers.
    """
    for run in runs:
        same = [r for r in runs if r["workload"] == run["workload"] and r is not run]
        original = next((r for r in same if r["runner"] == "original"), None)
        pools = sorted((r for r in same if r["runner"] == "pool"), key=lambda r: r["parallelism"])
        pool = next((r for r in pools if r["parallelism"] == run["parallelism"]), pools[-1] if pools else None)
        run["ratios"] = {}
        for name, base in (("vs_original", original), ("vs_pool", pool)):
            if base is None:
                continue
            figures: dict[str, Any] = {"baseline": base["label"]}
            for figure, get in RATIO_FIGURES:
                mine, theirs = get(run), get(base)
                figures[figure] = round(mine / theirs, 4) if mine is not None and theirs else None
            run["ratios"][name] = figures


# -- the suite ----------------------------------------------------------------------------


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from taskomatic.embedded.postgres import EmbeddedPostgres

    entries = suite(args.suite)
    if args.only:
        entries = [e for e in entries if e.workload.name in args.only]
    plans = {e.workload.name: generate(e.workload, args.seed) for e in entries}
    started_at = datetime.now(UTC)
    wall_start = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="taskomatic-bench-", dir="/tmp"))
    base.chmod(0o755)  # the unprivileged PostgreSQL user must reach it
    current: list[Runner | None] = [None]
    pg = EmbeddedPostgres(base / "postgres")
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_term(_signum: int, _frame: object) -> None:
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C must clean up even when the bench was started with SIGINT ignored (nohup, `&`).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    runs: list[dict[str, Any]] = []
    try:
        print(f"bench work directory: {base}", flush=True)
        pg.start()
        assert pg.pid is not None
        make_template(pg.dsn)
        conn = psycopg2.connect(pg.dsn)
        machine = machine_description(conn)
        conn.close()
        plugin_path = write_dist_info(base / "plugin")
        total = sum(e.workload.tasks * len(e.runners) for e in entries)
        with tqdm(total=total, unit="task", dynamic_ncols=True, disable=args.no_progress,
                  file=sys.stderr) as bar:
            ctx = Context(pg.dsn, pg.pid, base, plugin_path, args.seed, args.baseline_poll, args.set or [],
                          args.run_timeout, bar, lambda r: current.__setitem__(0, r))
            index = 0
            for entry in entries:
                for spec in entry.runners:
                    index += 1
                    bar.set_description(f"{entry.workload.name}: {spec.label}")
                    result = execute_run(ctx, entry.workload, plans[entry.workload.name], spec, index)
                    runs.append(result)
                    bar.write(_one_line(result))
    finally:
        runner = current[0]
        if runner is not None:
            runner.stop(timeout=5)
        pg.stop()
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
        if args.keep_work_dir:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
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
        "settings": {"baseline_poll_s": args.baseline_poll, "daemon_settings": args.set or [],
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


def daemon_config(overrides: list[str]) -> dict[str, Any]:
    """The settings every taskomatic run had: defaults (empty file, no environment) plus --set."""
    from dataclasses import asdict

    from taskomatic import config as config_mod

    resolved = asdict(config_mod.load(os.devnull, environ={}, overrides=config_mod.parse_overrides(overrides)))
    for private in ("dsn", "state_dir", "source_path", "shards"):
        resolved.pop(private, None)
    return resolved


def _one_line(r: dict[str, Any]) -> str:
    if r.get("error") and "latency_ms" not in r:
        first = r["error"].splitlines()[0]
        return f"  {r['workload']:<16} {r['label']:<34} FAILED: {first}"
    lat = r.get("latency_ms") or {}
    ms = f" makespan/LB {r['makespan_ratio']:.2f}" if r.get("makespan_ratio") else ""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
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
    parser.add_argument("--run-timeout", type=float, help="seconds one run may take (default: from the workload)")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the /tmp work directory (runner logs)")
    parser.set_defaults(suite="quick")
    args = parser.parse_args(argv)
    if args.only:
        known = {e.workload.name for e in suite(args.suite)}
        unknown = set(args.only) - known
        if unknown:
            parser.error(f"unknown workload(s) {', '.join(sorted(unknown))}; {args.suite} has {', '.join(known)}")
    if args.set:
        from taskomatic import config as config_mod

        try:
            config_mod.parse_overrides(args.set)
        except config_mod.ConfigError as exc:
            parser.error(str(exc))
    out = args.out or RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{args.suite}"
    try:
        results = run_suite(args)
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted; everything the bench started is stopped", file=sys.stderr)
        return 130
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
