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
  over the partial index ``tasks_claimed_idx``; unclaimed is the span of ids
  from the first id in ``tasks_claimable_idx`` to the last id inserted (the
  insert's ids are contiguous, checked, and a single instance claims the
  oldest first), and ended = tasks - unclaimed - held. The final counts come
  from a full scan after the daemon stopped;
* CPU seconds of PostgreSQL's process tree and of the daemon's process group.

Afterwards, in fresh ``python -c`` subprocesses: the RSS of the interpreter
alone and after importing psycopg2, libvirt, multiprocess, prometheus_client
and ``taskomatic.runtime.shard`` (cumulatively, and each alone), so the report
can say where a shard's memory goes. Results: printed, and
``bench/results/<stamp>-bounded/``: ``bounded.json`` and ``bounded.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench import measure
from bench.harness import NOOP_BACKLOG_SQL, RESULTS_DIR, Harness, Interrupted, create_database
from bench.runners import REPO, Runner, RunnerFailed, RunnerSpec

SHARD_TARGET_MB = 30.0  # issue 5: <= 30 MB RSS per shard
LEVEL_REL = 0.05  # memory levels off: last half's peak within 5 % ...
LEVEL_ABS_KB = 2048  # ... or 2 MB of the first half's peak
SLOWDOWN_RATIO = 0.9  # the backlog slows claiming if the last third's rate < 0.9 x the first third's

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

# Cumulative import steps of the shard breakdown: (label, modules imported by then).
BREAKDOWN_STEPS: list[tuple[str, list[str]]] = [
    ("interpreter alone", []),
    ("+ psycopg2", ["psycopg2"]),
    ("+ libvirt", ["psycopg2", "libvirt"]),
    ("+ multiprocess", ["psycopg2", "libvirt", "multiprocess"]),
    ("+ prometheus_client", ["psycopg2", "libvirt", "multiprocess", "prometheus_client"]),
    ("+ taskomatic.runtime.shard", ["psycopg2", "libvirt", "multiprocess", "prometheus_client",
                                    "taskomatic.runtime.shard"]),
    ("+ the bench plugin's actions", ["psycopg2", "libvirt", "multiprocess", "prometheus_client",
                                      "taskomatic.runtime.shard", "bench.plugin.actions"]),
]
ALONE_MODULES = ["psycopg2", "libvirt", "multiprocess", "prometheus_client", "taskomatic.runtime.shard"]

_MEASURE_CODE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
out = {"modules_loaded": len(sys.modules),
       "pulled_in": [m for m in ("psycopg2", "libvirt", "multiprocess", "prometheus_client") if m in sys.modules]}
with open("/proc/self/smaps_rollup") as f:
    for line in f:
        parts = line.split()
        if len(parts) >= 3 and parts[0].rstrip(":") in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
            out[parts[0].rstrip(":")] = int(parts[1])
print(json.dumps(out))
"""


# -- /proc ----------------------------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """{rss_kb, pss_kb, uss_kb} of a process (USS = Private_Clean + Private_Dirty); None if gone."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return None
    if "Rss" not in fields:
        return None
    return {"rss_kb": fields["Rss"], "pss_kb": fields.get("Pss", 0),
            "uss_kb": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def mapping_breakdown(pid: int, top: int = 12) -> dict[str, Any] | None:
    """Where a process's resident memory is, from /proc/<pid>/smaps: RSS and USS (kB) per mapped
    file (or [heap], [anon], [stack]...), the ``top`` largest by RSS, and the rest summed."""
    per: dict[str, list[int]] = {}
    name = "?"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if not parts[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
                    name = parts[5] if len(parts) >= 6 else "[anon]"
                    if name.startswith("/"):
                        name = os.path.basename(name)
                    continue
                if parts[0] in ("Rss:", "Private_Clean:", "Private_Dirty:"):
                    entry = per.setdefault(name, [0, 0])
                    if parts[0] == "Rss:":
                        entry[0] += int(parts[1])
                    else:
                        entry[1] += int(parts[1])
    except OSError:
        return None
    ranked = sorted(per.items(), key=lambda kv: -kv[1][0])
    rest = ranked[top:]
    return {"total_rss_kb": sum(v[0] for v in per.values()), "total_uss_kb": sum(v[1] for v in per.values()),
            "top": [{"mapping": k, "rss_kb": v[0], "uss_kb": v[1]} for k, v in ranked[:top]],
            "rest": {"mappings": len(rest), "rss_kb": sum(v[0] for _, v in rest), "uss_kb": sum(v[1] for _, v in rest)}}


def role_of(pid: int, leader: int, title: str) -> str:
    """supervisor, fetcher, shard N, reconciler (from ``taskomatic: ...`` process titles)."""
    return measure.daemon_role(title, pid == leader)


def role_kind(role: str) -> str:
    """The role without the shard number: supervisor, fetcher, shard, reconciler."""
    return "shard" if role.startswith("shard ") else role


def sample_processes(pgid: int, stats: list[measure.ProcStat]) -> dict[int, dict[str, Any]]:
    """{pid: {title, rss_kb, pss_kb, uss_kb}} for every live process of the daemon's group."""
    found: dict[int, dict[str, Any]] = {}
    for s in measure.group_members(pgid, stats):
        mem = smaps_rollup(s.pid)
        if mem is not None:
            found[s.pid] = {"title": measure.process_title(s.pid), **mem}
    return found


def is_titled(pid: int, leader: int, title: str) -> bool:
    """Has the process its final title? (A spawned child shows ``python -c from multiprocess...``
    until it sets ``taskomatic: <role>``.)"""
    return pid == leader or title.startswith("taskomatic: ") or "resource_tracker" in title


def by_role(raw: dict[int, list[int]], roles: dict[int, str]) -> dict[str, list[int]]:
    """A sample's {pid: values} keyed by each pid's role (the title it ended up with)."""
    out: dict[str, list[int]] = {}
    for pid, values in raw.items():
        role = roles.get(pid, f"untitled pid {pid}")
        if role in out:  # two processes with one role (a respawn): keep both
            role = f"{role} (pid {pid})"
        out[role] = values
    return out


# -- verdicts (pure) ------------------------------------------------------------------------


def levels_off(series: Sequence[tuple[float, float]], rel: float = LEVEL_REL,
               abs_kb: float = LEVEL_ABS_KB) -> dict[str, Any]:
    """Does a memory series (t, kB) level off? The peak of its last half (by time) must be within
    ``rel`` of, or ``abs_kb`` above, the peak of its first half. Undecided (None) with under 4 samples."""
    points = sorted(series)
    if len(points) < 4:
        return {"levels_off": None, "reason": f"{len(points)} samples (need 4)"}
    mid = (points[0][0] + points[-1][0]) / 2
    first = [v for t, v in points if t <= mid]
    last = [v for t, v in points if t > mid]
    if not first or not last:
        return {"levels_off": None, "reason": "all samples in one half"}
    first_peak, last_peak = max(first), max(last)
    allowed = max(rel * first_peak, abs_kb)
    return {"levels_off": last_peak - first_peak <= allowed, "first_half_peak_kb": first_peak,
            "last_half_peak_kb": last_peak, "growth_kb": last_peak - first_peak, "allowed_growth_kb": allowed}


def held_bounded(held: Sequence[int], capacity: int) -> dict[str, Any]:
    """Did the instance never hold more than its claim capacity (shards x max_claimed_per_shard)?"""
    peak = max(held) if held else None
    return {"held_max": peak, "capacity": capacity, "bounded": peak is not None and peak <= capacity,
            "held_max_share": round(peak / capacity, 4) if peak is not None and capacity else None}


def window_rates(samples: Sequence[tuple[float, int]], window_s: float) -> list[list[float]]:
    """Tasks/s in consecutive windows of ``window_s``: [start, end, tasks/s] from (t, ended) samples."""
    points = sorted(samples)
    if len(points) < 2 or window_s <= 0:
        return []
    out: list[list[float]] = []
    i = 0
    while i < len(points) - 1:
        j = i + 1
        while j < len(points) - 1 and points[j][0] - points[i][0] < window_s:
            j += 1
        dt = points[j][0] - points[i][0]
        if dt > 0:
            out.append([round(points[i][0], 3), round(points[j][0], 3), round((points[j][1] - points[i][1]) / dt, 1)])
        i = j
    return out


def throughput_trend(samples: Sequence[tuple[float, int, int]], ratio: float = SLOWDOWN_RATIO) -> dict[str, Any]:
    """Does the backlog slow the instance down? From (t, ended, unclaimed) samples: over the period
    from the first sample with a task ended to the last one with tasks still unclaimed (the daemon
    had to claim throughout), the rate of its first third against its last third (backlog large vs
    small). ``slows_down``: last / first < ``ratio``. Undecided with fewer than 2 samples per third."""
    points = sorted(samples)
    busy = [p for p in points if p[1] > 0]
    last_claiming = max((k for k, p in enumerate(busy) if p[2] > 0), default=None)
    if last_claiming is None:
        return {"slows_down": None, "reason": "no sample with tasks ended and tasks still unclaimed"}
    # The period ends at the first sample after the last one with a backlog (the backlog ran out in between).
    period = busy[: last_claiming + 2]
    if len(period) < 6:
        return {"slows_down": None, "reason": f"{len(period)} samples in the claiming period (need 6)"}
    t0, t1 = period[0][0], period[-1][0]
    third = (t1 - t0) / 3

    def rate(a: float, b: float) -> float | None:
        inside = [p for p in period if a - 1e-9 <= p[0] <= b + 1e-9]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    first, last = rate(t0, t0 + third), rate(t1 - third, t1)
    if first is None or last is None or first <= 0:
        return {"slows_down": None, "reason": "too few samples per third"}
    return {"slows_down": last / first < ratio, "period_s": [round(t0, 3), round(t1, 3)],
            "first_third_tps": round(first, 1), "last_third_tps": round(last, 1),
            "last_to_first": round(last / first, 3), "threshold": ratio,
            "backlog_at_start": period[0][2], "backlog_at_last_third": min(p[2] for p in period
                                                                           if p[0] >= t1 - third)}


def rate_between(samples: Sequence[tuple[float, int]], a: float, b: float) -> float | None:
    """Tasks/s between the first and the last (t, ended) sample within [a, b]; None with fewer than 2."""
    inside = sorted(p for p in samples if a <= p[0] <= b)
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return round((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]), 1)


def analyze_effect(samples: Sequence[tuple[float, int, int]]) -> dict[str, Any]:
    """When the tasks table was first ANALYZEd during the run (from (t, ended, analyzes) samples: the
    first sample whose count is higher than the first sample's) and the rate before and after it."""
    points = sorted(samples)
    if not points:
        return {"analyzed_during_run": None}
    at = next((p[0] for p in points if p[2] > points[0][2]), None)
    if at is None:
        return {"analyzed_during_run": False, "analyzes_at_start": points[0][2]}
    before = next(p for p in reversed(points) if p[0] < at)
    return {"analyzed_during_run": True, "analyzes_at_start": points[0][2], "first_seen_s": at,
            "ended_before": before[1],
            "tps_before": rate_between([(p[0], p[1]) for p in points], points[0][0], before[0]),
            "tps_after": rate_between([(p[0], p[1]) for p in points], at, points[-1][0])}


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


# -- the shard's memory breakdown -----------------------------------------------------------


def _measure_imports(modules: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _MEASURE_CODE, *modules], capture_output=True, text=True,
                         env=env, cwd=str(REPO), timeout=60, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    raw = json.loads(out.stdout)
    return {"rss_kb": raw["Rss"], "pss_kb": raw["Pss"], "uss_kb": raw["Private_Clean"] + raw["Private_Dirty"],
            "modules_loaded": raw["modules_loaded"], "pulled_in": raw["pulled_in"]}


def import_breakdown(plugin_path: Path) -> dict[str, Any]:
    """RSS of fresh interpreters: cumulative import steps, and each module alone (over the bare one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKOMATIC_", "PG"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(plugin_path)])
    steps = []
    previous = None
    for label, modules in BREAKDOWN_STEPS:
        m = _measure_imports(modules, env)
        m["step"] = label
        m["modules"] = modules
        if previous is not None and "rss_kb" in m and "rss_kb" in previous:
            m["added_rss_kb"] = m["rss_kb"] - previous["rss_kb"]
            m["added_uss_kb"] = m["uss_kb"] - previous["uss_kb"]
        steps.append(m)
        previous = m
    bare = steps[0]
    alone = {}
    for name in ALONE_MODULES:
        m = _measure_imports([name], env)
        if "rss_kb" in m and "rss_kb" in bare:
            m["over_bare_rss_kb"] = m["rss_kb"] - bare["rss_kb"]
            m["over_bare_uss_kb"] = m["uss_kb"] - bare["uss_kb"]
        alone[name] = m
    return {"python": sys.executable, "steps": steps, "alone": alone}


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


# -- analysis -------------------------------------------------------------------------------


def analyse(result: dict[str, Any], samples: list[dict[str, Any]], tasks: int, capacity: int) -> dict[str, Any]:
    roles: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for s in samples:
        for role, (rss, pss, uss) in s["procs"].items():
            r = roles.setdefault(role, {"rss": [], "pss": [], "uss": []})
            r["rss"].append((s["t"], rss))
            r["pss"].append((s["t"], pss))
            r["uss"].append((s["t"], uss))
    memory: dict[str, dict[str, Any]] = {}
    for role in sorted(roles, key=_role_order):
        r = roles[role]
        memory[role] = {
            "samples": len(r["rss"]),
            "peak_rss_kb": max(v for _, v in r["rss"]), "peak_pss_kb": max(v for _, v in r["pss"]),
            "peak_uss_kb": max(v for _, v in r["uss"]), "last_rss_kb": r["rss"][-1][1],
            "first_rss_kb": r["rss"][0][1],
            "rss_levels_off": levels_off(r["rss"]), "uss_levels_off": levels_off(r["uss"]),
        }
    per_kind: dict[str, dict[str, Any]] = {}
    for role, m in memory.items():
        kind = role_kind(role)
        k = per_kind.setdefault(kind, {"processes": 0, "peak_rss_kb": 0, "peak_pss_kb": 0, "peak_uss_kb": 0,
                                       "levels_off": True})
        k["processes"] += 1
        for f in ("peak_rss_kb", "peak_pss_kb", "peak_uss_kb"):
            k[f] = max(k[f], m[f])
        decided = m["rss_levels_off"]["levels_off"]
        k["levels_off"] = None if decided is None or k["levels_off"] is None else k["levels_off"] and decided
    shard_peaks: list[int] = [m["peak_rss_kb"] for role, m in memory.items() if role_kind(role) == "shard"]
    shard_peak = max(shard_peaks) if shard_peaks else None
    total_series = [(s["t"], sum(p[0] for p in s["procs"].values())) for s in samples]
    final = result.get("final") or {}
    tps = None
    if final.get("first_start") and final.get("last_end") and final["last_end"] > final["first_start"]:
        tps = round(final["finished"] / (final["last_end"] - final["first_start"]), 1)
    span = samples[-1]["t"] - samples[0]["t"] if len(samples) > 1 else 0
    window = max(2 * (samples[1]["t"] - samples[0]["t"]) if len(samples) > 1 else 1.0, span / 20)
    cpu = result.get("cpu") or {}
    ended = samples[-1]["ended"] if samples else 0
    return {
        "memory": memory,
        "memory_by_kind": per_kind,
        "memory_total": {"peak_rss_kb": max((v for _, v in total_series), default=None),
                         "rss_levels_off": levels_off(total_series)},
        "shard_target": {"target_mb": SHARD_TARGET_MB, "peak_shard_rss_mb": round(shard_peak / 1024, 1)
                         if shard_peak else None,
                         "over_by_mb": round(shard_peak / 1024 - SHARD_TARGET_MB, 1) if shard_peak else None,
                         "met": shard_peak is not None and shard_peak / 1024 <= SHARD_TARGET_MB},
        "held": held_bounded([s["held"] for s in samples], capacity),
        "throughput": {
            "tasks_per_s": tps,
            "definition": "finished tasks / (last time_ended - first time_started), from the table",
            "window_s": round(window, 2),
            "windows": window_rates([(s["t"], s["ended"]) for s in samples], window),
            "trend": throughput_trend([(s["t"], s["ended"], s["unclaimed"]) for s in samples]),
            "trend_after_first_analyze": throughput_trend([(s["t"], s["ended"], s["unclaimed"]) for s in samples
                                                           if s["analyzes"] > samples[0]["analyzes"]]),
            "analyze": analyze_effect([(s["t"], s["ended"], s["analyzes"]) for s in samples]),
        },
        "cpu_per_1k": {"postgres_s": round(cpu["postgres_s"] / ended * 1000, 4) if ended and cpu else None,
                       "daemon_s": round(cpu["daemon_s"] / ended * 1000, 4) if ended and cpu else None},
        "sample_query_ms": {"max": max((s["query_ms"] for s in samples), default=None),
                            "mean": round(sum(s["query_ms"] for s in samples) / len(samples), 2) if samples else None},
        "complete": result.get("error") is None and final.get("finished") == tasks,
    }


def _role_order(role: str) -> tuple[int, int, str]:
    order = {"supervisor": 0, "fetcher": 1, "shard": 2, "reconciler": 3}
    kind = role_kind(role)
    number = int(role.split()[1]) if kind == "shard" and role.split()[1].isdigit() else 0
    return order.get(kind, 9), number, role


# -- output ---------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    fig, (ax_mem, ax_tps) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True)
    for role in results["memory"]:
        ts = [s["t"] for s in samples if role in s["procs"]]
        line = ax_mem.plot(ts, [s["procs"][role][0] / 1024 for s in samples if role in s["procs"]],
                           label=f"{role} RSS")[0]
        ax_mem.plot(ts, [s["procs"][role][2] / 1024 for s in samples if role in s["procs"]], linestyle="--",
                    color=line.get_color(), linewidth=0.8)
    ax_mem.axhline(SHARD_TARGET_MB, color="red", linestyle=":", linewidth=1, label="30 MB shard target")
    ax_mem.set_ylabel("MB (solid RSS, dashed USS)")
    ax_mem.set_title(f"taskomatic {results['settings']['shards']} shards, "
                     f"{results['settings']['tasks']:,} queued noop tasks: memory per process")
    ax_mem.legend(fontsize=7, ncol=2, loc="lower right")
    ax_mem.grid(alpha=0.3)
    windows = results["throughput"]["windows"]
    if windows:
        xs, ys = [], []
        for a, b, r in windows:
            xs += [a, b]
            ys += [r, r]
        ax_tps.plot(xs, ys, color="tab:blue", label="tasks ended / s")
    ax_tps.set_ylabel("tasks/s", color="tab:blue")
    ax_tps.set_xlabel("seconds since the daemon's launch")
    if results.get("ready_s") is not None:
        for ax in (ax_mem, ax_tps):
            ax.axvline(results["ready_s"], color="grey", linestyle=":", linewidth=1)
    analyzed = results["throughput"]["analyze"]
    if analyzed.get("analyzed_during_run"):
        ax_tps.axvline(analyzed["first_seen_s"], color="green", linestyle="--", linewidth=1,
                       label="tasks ANALYZEd (autovacuum)")
    ax_tps.grid(alpha=0.3)
    ax_held = ax_tps.twinx()
    ax_held.plot([s["t"] for s in samples], [s["held"] for s in samples], color="tab:orange", linewidth=0.8,
                 label="held by the instance")
    ax_held.axhline(results["claim_capacity"]["capacity"], color="tab:orange", linestyle=":", linewidth=1,
                    label="claim capacity")
    ax_held.set_ylabel("tasks held", color="tab:orange")
    ax_held.set_ylim(bottom=0, top=results["claim_capacity"]["capacity"] * 1.15)
    ax_tps.set_title("throughput (windows) and tasks held")
    ax_tps.set_ylim(bottom=0)
    handles = ax_tps.get_legend_handles_labels()
    held_handles = ax_held.get_legend_handles_labels()
    ax_tps.legend(handles[0] + held_handles[0], handles[1] + held_handles[1], fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def to_json(results: dict[str, Any]) -> str:
    """Indented, but one line per sample (the JSON stays small and readable)."""
    head = {k: v for k, v in results.items() if k != "samples"}
    text = json.dumps(head, indent=1)
    samples = ",\n  ".join(json.dumps(s, separators=(",", ":")) for s in results.get("samples", []))
    return text[:-2] + f',\n "samples": [\n  {samples}\n ]\n}}\n'


def _mb(kb: float | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def summary(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [f"bounded: {s['tasks']:,} noop tasks over {s['keys']:,} keys, taskomatic {s['shards']} shards"]
    if "backlog" in results:
        lines.append(f"  insert: {results['backlog']['insert_s']:.1f} s (one INSERT ... SELECT FROM generate_series; "
                     f"table {results['backlog']['table_mb_after_insert']} MB)")
    if results.get("error"):
        lines.append(f"  ERROR: {results['error'].splitlines()[0]}")
    thr = results["throughput"]
    final = results.get("final") or {}
    lines.append(f"  finished {final.get('finished', '?')} failed {final.get('failed', '?')}; "
                 f"{thr['tasks_per_s']} tasks/s overall; READY {results.get('ready_s')} s and all ended "
                 f"{results.get('all_ended_s', '-')} s after the launch")
    trend = thr["trend"]
    if trend.get("slows_down") is not None:
        lines.append(f"  backlog {trend['backlog_at_start']:,} -> {trend['backlog_at_last_third']:,}: first third "
                     f"{trend['first_third_tps']:,.0f} tasks/s, last third {trend['last_third_tps']:,.0f} "
                     f"(x{trend['last_to_first']}): {'SLOWS DOWN' if trend['slows_down'] else 'no slowdown'}")
    else:
        lines.append(f"  throughput trend: undecided ({trend.get('reason')})")
    after = thr["trend_after_first_analyze"]
    if after.get("slows_down") is not None:
        lines.append(f"  after the first ANALYZE: first third {after['first_third_tps']:,.0f} tasks/s, last third "
                     f"{after['last_third_tps']:,.0f} (x{after['last_to_first']}): "
                     f"{'SLOWS DOWN' if after['slows_down'] else 'no slowdown'}")
    an = thr["analyze"]
    if an.get("analyzed_during_run"):
        lines.append(f"  tasks first ANALYZEd (autovacuum) by t={an['first_seen_s']:.0f} s, {an['ended_before']:,} "
                     f"ended before: {an['tps_before']} tasks/s before, {an['tps_after']} after")
    elif an.get("analyzed_during_run") is False:
        lines.append(f"  tasks not ANALYZEd during the run (ANALYZEs before it: {an['analyzes_at_start']})")
    lines.append("  windows (s, tasks/s): " + ", ".join(f"{a:.0f}-{b:.0f}: {r:,.0f}" for a, b, r in thr["windows"]))
    held = results["held"]
    lines.append(f"  held at most {held['held_max']} of capacity {held['capacity']} "
                 f"({results['claim_capacity']['shards']} x {results['claim_capacity']['max_claimed_per_shard']}): "
                 f"{'bounded' if held['bounded'] else 'NOT BOUNDED'}")
    lines.append("  memory (MB)            peak RSS  peak PSS  peak USS  first RSS  last RSS  levels off")
    for role, m in results["memory"].items():
        lo = m["rss_levels_off"]
        verdict = {True: "yes", False: "NO", None: "?"}[lo["levels_off"]]
        if lo["levels_off"] is not None:
            verdict += f" ({lo['growth_kb'] / 1024:+.1f} MB)"
        lines.append(f"  {role:<20} {_mb(m['peak_rss_kb']):>9} {_mb(m['peak_pss_kb']):>9} {_mb(m['peak_uss_kb']):>9} "
                     f"{_mb(m['first_rss_kb']):>10} {_mb(m['last_rss_kb']):>9}  {verdict}")
    st = results["shard_target"]
    if st["peak_shard_rss_mb"] is not None:
        lines.append(f"  shard target <= {st['target_mb']:.0f} MB RSS: peak shard {st['peak_shard_rss_mb']} MB, "
                     f"{'met' if st['met'] else 'missed'} ({st['over_by_mb']:+.1f} MB)")
    cpu = results.get("cpu")
    if cpu:
        lines.append(f"  CPU: daemon {cpu['daemon_s']:.1f} s, PostgreSQL {cpu['postgres_s']:.1f} s over "
                     f"{cpu['wall_s']:.0f} s; per 1k tasks daemon {results['cpu_per_1k']['daemon_s']} s, "
                     f"PostgreSQL {results['cpu_per_1k']['postgres_s']} s; other load {cpu['other_share']:.0%}")
    for role, mapping in (results.get("mappings") or {}).items():
        if mapping and role == "shard 0":
            lines.append(f"  {role} at the end, resident by mapping (MB RSS/USS): " + ", ".join(
                f"{m['mapping']} {_mb(m['rss_kb'])}/{_mb(m['uss_kb'])}" for m in mapping["top"])
                + f"; {mapping['rest']['mappings']} more {_mb(mapping['rest']['rss_kb'])}"
                  f"/{_mb(mapping['rest']['uss_kb'])}")
    breakdown = results.get("import_breakdown")
    if breakdown:
        lines.append("  fresh interpreter (MB)             RSS    USS   added RSS")
        for step in breakdown["steps"]:
            if "rss_kb" not in step:
                lines.append(f"  {step['step']:<32} error: {step.get('error')}")
                continue
            added = step.get("added_rss_kb")
            lines.append(f"  {step['step']:<32} {_mb(step['rss_kb']):>6} {_mb(step['uss_kb']):>6} "
                         f"{'' if added is None else f'{added / 1024:+.1f}':>10}")
        lines.append("  each alone over the bare interpreter (RSS MB): " + ", ".join(
            f"{name} {m['over_bare_rss_kb'] / 1024:+.1f}" for name, m in breakdown["alone"].items()
            if "over_bare_rss_kb" in m))
    return "\n".join(lines)


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
