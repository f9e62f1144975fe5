"""What the soak samples while it runs: the daemon's processes, connections, the nodes, the task counts.

Every ``--interval`` the :class:`Sampler` reads the RSS of every daemon process
(by pid; the process title says its role), the daemon's connections in
``pg_stat_activity`` (by ``application_name``), the client sockets of each
node's ``libvirtd`` (its ``/proc/<pid>/fd`` against ``/proc/net/unix``), the
nodes' RSS, the queued, running and ended task counts, and cumulative CPU
seconds (``cpu_figures`` turns them into the load window's shares).
"""

from __future__ import annotations

import os
from typing import Any

from bench import lifecycle, measure
from bench.runners import Runner

BENCH_APP = "bench soak"  # the bench's own connection, left out of the counts


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process, kB (None when it is gone)."""
    return measure.status_kb(pid, "VmRSS")


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

