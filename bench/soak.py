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
running and ended task counts. Once every task has ended it keeps sampling the
idle daemon for a few seconds (the "end" of the connection verdicts), stops
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
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench import lifecycle, measure
from bench import soak_verdicts as verdicts
from bench.plugin import write_dist_info
from bench.run import Interrupted, daemon_config, fresh_database, insert_tasks, machine_description, make_template
from bench.runners import REPO, Runner, RunnerFailed, RunnerSpec
from bench.workloads import PlannedTask, Workload, generate, lifecycle_final_states

RESULTS_DIR = REPO / "bench" / "results"
SCHEMA_VERSION = 1
FEED_TICK = 0.05  # seconds between inserts of what is due
MULTIHOST = "daemon.mode=multihost"
BENCH_APP = "bench soak"  # the bench's own connection, left out of the counts


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


# -- sampling ---------------------------------------------------------------------------------------


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process, kB (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


role_of = measure.daemon_role  # (title, is_leader) -> "supervisor", "fetcher", "shard 3"...


def unix_sockets() -> dict[int, tuple[int, str, str]]:
    """/proc/net/unix: inode -> (flags, state, path)."""
    out = {}
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) < 7:
                    continue
                out[int(fields[6])] = (int(fields[3], 16), fields[5], fields[7] if len(fields) > 7 else "")
    except OSError:
        pass
    return out


SO_ACCEPTCON = 0x10000  # the flag of a listening socket in /proc/net/unix


def socket_inodes(pid: int) -> list[int]:
    """Inodes of the sockets process ``pid`` has open."""
    found: list[int] = []
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for entry in entries:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found.append(int(link[8:-1]))
    return found


def node_clients(pid: int, socket_path: str, table: dict[int, tuple[int, str, str]]) -> int:
    """Client connections a libvirtd holds on its socket: its accepted (non-listening) sockets bound to that path."""
    count = 0
    for inode in socket_inodes(pid):
        entry = table.get(inode)
        if entry is not None and entry[2] == socket_path and not entry[0] & SO_ACCEPTCON:
            count += 1
    return count


TASK_COUNTS_SQL = """
SELECT count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'running') AS running,
       count(*) FILTER (WHERE state IN ('finished', 'failed', 'canceled')) AS ended
FROM tasks
"""
PG_SQL = """
SELECT coalesce(application_name, ''), count(*) FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend' AND application_name <> %s
GROUP BY 1
"""


class Sampler:
    """Takes the samples of one configuration run (columnar, so roles may come and go)."""

    def __init__(self, conn: Any, runners: list[Runner], nodes: lifecycle.Nodes, multihost: bool,
                 postmaster_pid: int) -> None:
        self.conn = conn
        self.postmaster_pid = postmaster_pid
        self.runners = runners
        self.nodes = nodes
        self.prefix = [f"i{i + 1} " if multihost else "" for i in range(len(runners))]
        self.t: list[float] = []
        self.rows: list[dict[str, Any]] = []

    def take(self, t: float, inserted: int) -> dict[str, Any]:
        stats = measure.all_stats()
        rss: dict[str, int] = {}
        pids: dict[str, int] = {}
        for prefix, runner in zip(self.prefix, self.runners, strict=True):
            for s in measure.group_members(runner.pid, stats):
                kb = rss_kb(s.pid)
                if kb is None:
                    continue
                role = prefix + role_of(measure.process_title(s.pid), s.pid == runner.pid)
                if role in rss:  # two processes with one title (should not happen): keep both
                    role = f"{role} ({s.pid})"
                rss[role], pids[role] = kb, s.pid
        # Cumulative CPU seconds (own + reaped children) of the daemon's process groups, PostgreSQL's
        # tree, the nodes' groups, the bench, and the whole machine: differences give the shares.
        daemon = [m for r in self.runners for m in measure.group_members(r.pid, stats)]
        cpu = {"daemon_s": _ticks(daemon), "postgres_s": _ticks(measure.tree_members(self.postmaster_pid, stats)),
               "nodes_s": _ticks(lifecycle.node_cpu_members(self.nodes.pids, stats)),
               "bench_s": round(measure.self_cpu_seconds(), 2),
               "machine_busy_s": round(measure.machine_busy_seconds(), 2)}
        table = unix_sockets()
        libvirt_clients, libvirtd_rss = {}, {}
        for node in self.nodes.nodes:
            if node.pid is not None:
                libvirt_clients[node.name] = node_clients(node.pid, str(node.socket_path), table)
                libvirtd_rss[node.name] = rss_kb(node.pid) or 0
        with self.conn.cursor() as cur:
            cur.execute(TASK_COUNTS_SQL)
            queued, running, ended = (int(v) for v in cur.fetchone())
            cur.execute(PG_SQL, (BENCH_APP,))
            pg = {name: int(n) for name, n in cur.fetchall()}
        self.conn.commit()
        row = {"inserted": inserted, "queued": queued, "running": running, "ended": ended, "rss_kb": rss,
               "pids": pids, "pg": pg, "pg_total": sum(pg.values()), "libvirt": libvirt_clients,
               "libvirt_total": sum(libvirt_clients.values()), "libvirtd_rss_kb": libvirtd_rss, "cpu": cpu}
        self.t.append(round(t, 3))
        self.rows.append(row)
        return row

    def columns(self) -> dict[str, Any]:
        """The samples as columns: {t: [...], tasks: {...}, rss_kb: {role: [...]}, ...}; None where absent."""
        def column(get: Any) -> list[Any]:
            return [get(r) for r in self.rows]

        def keyed(field: str) -> dict[str, list[Any]]:
            names = sorted({k for r in self.rows for k in r[field]}, key=_role_order)
            return {name: column(lambda r, n=name: r[field].get(n)) for name in names}

        def changes(values: list[Any]) -> list[Any]:
            """The distinct pids a role had, in order (a respawn adds one); gaps left out."""
            out: list[Any] = []
            for v in values:
                if v is not None and (not out or out[-1] != v):
                    out.append(v)
            return out

        return {
            "t": self.t,
            "tasks": {k: column(lambda r, k=k: r[k]) for k in ("inserted", "queued", "running", "ended")},
            "rss_kb": keyed("rss_kb"), "pids": {role: changes(v) for role, v in keyed("pids").items()},
            "pg": keyed("pg"),
            "pg_total": column(lambda r: r["pg_total"]), "libvirt": keyed("libvirt"),
            "libvirt_total": column(lambda r: r["libvirt_total"]), "libvirtd_rss_kb": keyed("libvirtd_rss_kb"),
            "cpu": keyed("cpu"),
        }


def _ticks(members: list[measure.ProcStat]) -> float:
    return round(sum(measure.cpu_snapshot(members).values()) / measure.CLOCK_TICKS, 2)


def cpu_figures(columns: dict[str, Any], end: float, tasks: int) -> dict[str, Any] | None:
    """CPU over the load window (first sample to the last one at or before ``end``): seconds of the daemon,
    PostgreSQL, the nodes, the bench, and the share of the machine everything else took (foreign load)."""
    t = columns["t"]
    cpu = columns.get("cpu") or {}
    last = max((i for i, x in enumerate(t) if x <= end), default=None)
    if not cpu or last is None or last == 0:
        return None
    wall = t[last] - t[0]
    out: dict[str, Any] = {name: round(values[last] - values[0], 2) for name, values in cpu.items()}
    ours = sum(out[k] for k in ("daemon_s", "postgres_s", "nodes_s", "bench_s"))
    cores = os.cpu_count() or 1
    out["window_s"] = round(wall, 2)
    out["daemon_s_per_1k"] = round(out["daemon_s"] / tasks * 1000, 3) if tasks else None
    out["postgres_s_per_1k"] = round(out["postgres_s"] / tasks * 1000, 3) if tasks else None
    out["machine_busy_share"] = round(out["machine_busy_s"] / (wall * cores), 3) if wall > 0 else None
    out["other_share"] = round(max(0.0, out["machine_busy_s"] - ours) / (wall * cores), 3) if wall > 0 else None
    return out


def _role_order(role: str) -> tuple[Any, ...]:
    """i1 supervisor, i1 fetcher, i1 reconciler, i1 shard 0, 1, ..., 10 (numbers as numbers)."""
    parts = role.split()
    instance = parts[0] if parts and parts[0].startswith("i") and parts[0][1:].isdigit() else ""
    rest = parts[1:] if instance else parts
    rank = {"supervisor": 0, "fetcher": 1, "reconciler": 2, "shard": 3}.get(rest[0] if rest else "", 9)
    number = int(rest[1]) if len(rest) > 1 and rest[1].isdigit() else -1
    return (int(instance[1:]) if instance else 0, rank, number, role)


# -- one configuration ----------------------------------------------------------------------------------


@dataclass
class Ctx:
    server_dsn: str
    postmaster_pid: int
    work_dir: Path
    plugin_path: Path
    overrides: list[str]
    bar: Any
    started: list[Runner]
    nodes: list[lifecycle.Nodes]


def run_setup(ctx: Ctx, size: Size, setup: Setup, tasks: list[PlannedTask], index: int) -> dict[str, Any]:
    result: dict[str, Any] = {"setup": setup.name, "label": setup.label, "instances": setup.instances,
                              "shards_per_instance": setup.shards, "mode": "multihost" if setup.multihost
                              else "standalone", "rate_tps": setup.rate, "tasks": len(tasks), "vms": size.vms,
                              "interval_s": size.interval, "error": None}
    wall_start = time.monotonic()
    with fresh_database(ctx.server_dsn) as dsn:
        nodes = lifecycle.Nodes(lifecycle.short_dir(ctx.work_dir, index))
        ctx.nodes.append(nodes)
        runners: list[Runner] = []
        conn = None
        try:
            nodes.start()
            host_ids = lifecycle.seed_database(dsn, nodes.uris, size.vms)
            settings = [*nodes.daemon_settings(), *([MULTIHOST] if setup.multihost else []), *ctx.overrides]
            run_dir = ctx.work_dir / f"run{index:02d}-{setup.name}"
            for i in range(setup.instances):
                runner = Runner(RunnerSpec("taskomatic", setup.shards), dsn, run_dir / f"instance{i + 1}",
                                ctx.plugin_path, 1.0, settings)
                runners.append(runner)
                ctx.started.append(runner)
            result["ready_s"] = [round(r.wait_ready(), 3) for r in runners]
            conn = psycopg2.connect(dsn, application_name=BENCH_APP)
            sampler = Sampler(conn, runners, nodes, setup.multihost, ctx.postmaster_pid)
            load_end = _feed_and_sample(ctx, size, setup, tasks, runners, sampler, result)
            result["load_end_s"] = load_end
            final = sampler.rows[-1] if sampler.rows else None
            codes = [_stop(ctx, r) for r in runners]
            result["exit_codes"] = codes
            if any(c != 0 for c in codes) and result["error"] is None:
                result["error"] = f"an instance did not stop cleanly on SIGTERM (exit codes {codes})"
            result["log_notes"] = {f"instance {i + 1}": _log_lines(r) for i, r in enumerate(runners)}
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
                _stop(ctx, runner, timeout=5)
            if conn is not None:
                conn.close()
            try:
                nodes.stop()
            except RuntimeError as exc:
                result["error"] = result["error"] or str(exc)
            ctx.nodes.remove(nodes)
    result["wall_s"] = round(time.monotonic() - wall_start, 1)
    result["ok"] = result["error"] is None and bool(result.get("verdicts")) and verdicts_ok(result["verdicts"])
    return result


def _stop(ctx: Ctx, runner: Runner, timeout: float = 60.0) -> int | None:
    if runner not in ctx.started:
        return runner.process.returncode
    code = runner.stop(timeout=timeout)
    ctx.started.remove(runner)
    return code


ANOMALIES = ("Traceback", "ERROR", "died", "respawn", "lease lost", "rejoin", "write refused")


def _log_lines(runner: Runner, limit: int = 20) -> list[str]:
    try:
        text = runner.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if any(n in line for n in ANOMALIES)][:limit]


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
            for i, r in enumerate(runners):
                if r.process.poll() is not None:
                    raise RunnerFailed(f"instance {i + 1} exited with {r.process.returncode} mid-run:\n"
                                       f"{r.log_tail()}")
        if now > deadline and load_end is None:
            result["error"] = f"not every task ended within {timeout:.0f}s"
            return now - start
        wake = min(next_sample, now + FEED_TICK) if inserted < n else next_sample
        time.sleep(max(0.0, wake - time.monotonic()))


# -- verdicts and figures ------------------------------------------------------------------------------


def _series(t: list[float], values: list[Any]) -> verdicts.Series:
    return [(a, float(v)) for a, v in zip(t, values, strict=True) if v is not None]


def compute_verdicts(columns: dict[str, Any], load_end: float, final: dict[str, Any] | None,
                     inserted: int) -> dict[str, Any]:
    """Every verdict from the samples (see bench/soak_verdicts.py for the definitions)."""
    t = columns["t"]
    memory = {role: verdicts.memory_verdict(_series(t, values), 0.0, load_end)
              for role, values in columns["rss_kb"].items()}
    nodes_memory = {node: verdicts.memory_verdict(_series(t, values), 0.0, load_end)
                    for node, values in columns["libvirtd_rss_kb"].items()}
    # A connection name absent from a sample had 0 connections then.
    pg = {name: verdicts.connection_verdict([(a, float(v or 0)) for a, v in zip(t, values, strict=True)], 0.0,
                                            load_end)
          for name, values in columns["pg"].items()}
    pg_total = verdicts.connection_verdict(_series(t, columns["pg_total"]), 0.0, load_end)
    libvirt = {node: verdicts.connection_verdict(_series(t, values), 0.0, load_end)
               for node, values in columns["libvirt"].items()}
    final = final or {"queued": -1, "running": -1, "ended": -1}
    backlog = verdicts.backlog_verdict(inserted, final["queued"], final["running"], final["ended"])
    pids = {role: [p for p in values if p is not None] for role, values in columns["pids"].items()}
    return {
        "load_window_s": [0.0, round(load_end, 3)],
        "memory": memory,
        "memory_ok": all(v["growing"] is False for v in memory.values()),
        "memory_growing": sorted(role for role, v in memory.items() if v["growing"]),
        "nodes_memory": nodes_memory,  # informational: the test driver's state grows with the domains defined
        "pg_connections": pg,
        "pg_connections_total": pg_total,
        "libvirt_connections": libvirt,
        "connections_ok": (pg_total["leaked"] is False and all(v["leaked"] is False for v in pg.values())
                           and all(v["leaked"] is False for v in libvirt.values())),
        "backlog": backlog,
        "restarts": verdicts.restarts(pids),
    }


def verdicts_ok(v: dict[str, Any]) -> bool:
    return bool(v.get("memory_ok") and v.get("connections_ok") and v.get("backlog", {}).get("ok")
                and not v.get("restarts") and v.get("order", {}).get("ok") and v.get("lifecycle", {}).get("ok"))


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

    from taskomatic.embedded.postgres import EmbeddedPostgres

    setups = [s for s in size.setups if args.only in (None, s.name)]
    if args.rate:
        setups = [replace(s, rate=args.rate) for s in setups]
    tasks = generate(workload_for(size, setups[0].rate), args.seed)
    overrides = list(args.set or [])
    started_at = datetime.now(UTC)
    wall_start = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="taskomatic-soak-", dir="/tmp"))
    base.chmod(0o755)  # the unprivileged PostgreSQL and libvirtd users must reach it
    pg = EmbeddedPostgres(base / "postgres")
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_term(_signum: int, _frame: object) -> None:
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C must clean up even when the bench was started with SIGINT ignored (nohup, `&`).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    runs: list[dict[str, Any]] = []
    ctx: Ctx | None = None
    try:
        print(f"soak work directory: {base}", flush=True)
        pg.start()
        make_template(pg.dsn)
        conn = psycopg2.connect(pg.dsn)
        machine = machine_description(conn)
        conn.close()
        plugin_path = write_dist_info(base / "plugin")
        with tqdm(total=len(tasks) * len(setups), unit="task", dynamic_ncols=True, disable=args.no_progress,
                  file=sys.stderr) as bar:
            assert pg.pid is not None
            ctx = Ctx(pg.dsn, pg.pid, base, plugin_path, overrides, bar, [], [])
            for index, setup in enumerate(setups, start=1):
                bar.set_description(f"soak {setup.name}")
                result = run_setup(ctx, size, setup, tasks, index)
                runs.append(result)
                bar.write(one_line(result))
    finally:
        if ctx is not None:
            for runner in list(ctx.started):
                _stop(ctx, runner, timeout=5)
            for nodes in list(ctx.nodes):
                try:
                    nodes.stop()
                except RuntimeError as exc:
                    print(f"warning: {exc}", file=sys.stderr)
        pg.stop()
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
        if args.keep_work_dir:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
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


def verdict_flags(v: dict[str, Any]) -> dict[str, bool]:
    """Each verdict as one boolean (what the summary and the exit code go by)."""
    return {"memory levels off": bool(v.get("memory_ok")),
            "no leaked connections": bool(v.get("connections_ok")),
            "backlog 0, ended == queued": bool(v.get("backlog", {}).get("ok")),
            "no process restarted": not v.get("restarts"),
            "per-key order": bool(v.get("order", {}).get("ok")),
            "every task ended once, VM rows match the domains": bool(v.get("lifecycle", {}).get("ok"))}


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
    if args.set:
        from taskomatic import config as config_mod

        try:
            config_mod.parse_overrides(args.set)
        except config_mod.ConfigError as exc:
            parser.error(str(exc))
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
