"""What the bench measures: CPU and memory from /proc, and everything else from the tasks table.

CPU seconds of a set of processes between two moments: for each process
alive at either moment, utime + stime (its own) plus cutime + cstime (the
children it has reaped: a backend or worker that exited in between is counted
through its parent). The difference of the two sums is what the set used in
between; processes are identified by (pid, start time), so a reused pid is
not mistaken for the same process.
"""

from __future__ import annotations

import bisect
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extras

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    pgrp: int
    starttime: int
    own_ticks: int  # utime + stime
    reaped_ticks: int  # cutime + cstime


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = data.rsplit(b")", 1)[1].split()
    # fields[0] is field 3 (state), so field n is fields[n - 3].
    return ProcStat(pid=pid, ppid=int(fields[1]), pgrp=int(fields[2]), starttime=int(fields[19]),
                    own_ticks=int(fields[11]) + int(fields[12]),
                    reaped_ticks=int(fields[13]) + int(fields[14]))


def all_stats() -> list[ProcStat]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat is not None:
                found.append(stat)
    return found


def group_members(pgid: int, stats: list[ProcStat] | None = None) -> list[ProcStat]:
    """Every process of process group ``pgid``."""
    return [s for s in (stats if stats is not None else all_stats()) if s.pgrp == pgid]


def tree_members(root: int, stats: list[ProcStat] | None = None) -> list[ProcStat]:
    """``root`` and all its descendants (PostgreSQL backends leave the postmaster's group, not its tree)."""
    stats = stats if stats is not None else all_stats()
    children: dict[int, list[ProcStat]] = defaultdict(list)
    by_pid = {}
    for s in stats:
        children[s.ppid].append(s)
        by_pid[s.pid] = s
    if root not in by_pid:
        return []
    found, todo = [], [by_pid[root]]
    while todo:
        s = todo.pop()
        found.append(s)
        todo.extend(children[s.pid])
    return found


CpuSnapshot = dict[tuple[int, int], int]


def cpu_snapshot(members: list[ProcStat]) -> CpuSnapshot:
    return {(s.pid, s.starttime): s.own_ticks + s.reaped_ticks for s in members}


def cpu_seconds(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """CPU seconds the set used between the snapshots (see the module doc).

    A process of ``before`` gone by ``after`` was reaped by its parent in the
    set, whose reaped ticks now hold its whole lifetime: its ticks at
    ``before`` come off like everyone's. (Both snapshots are taken while the
    runner lives, so nobody outside the set reaps a member in between.)
    """
    return max(0, sum(after.values()) - sum(before.values())) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


def self_cpu_seconds() -> float:
    """CPU seconds of this process (the bench: inserts, progress queries)."""
    times = os.times()
    return times.user + times.system


def process_counters(pid: int) -> dict[str, int] | None:
    """A process's CPU ticks (user + system, and system alone), its nanoseconds on a CPU (schedstat,
    brought up to date at each context switch) and its voluntary and involuntary context switches."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/schedstat") as f:
            on_cpu_ns = int(f.read().split()[0])
        switches: dict[str, int] = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    name, value = line.split(":")
                    switches[name] = int(value)
        # fields[0] is field 3 (state): utime and stime, fields 14 and 15, are fields[11] and fields[12].
        user, system = int(fields[11]), int(fields[12])
    except (OSError, IndexError, ValueError):
        return None
    return {"ticks": user + system, "system_ticks": system, "on_cpu_ns": on_cpu_ns,
            "voluntary": switches.get("voluntary_ctxt_switches", 0),
            "involuntary": switches.get("nonvoluntary_ctxt_switches", 0)}


def process_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


def status_kb(pid: int, field: str) -> int | None:
    """A kB field of /proc/<pid>/status (``VmRSS``, ``VmHWM``...); None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_kb(pid: int) -> int | None:
    """VmHWM: the process's peak resident set, in kB."""
    return status_kb(pid, "VmHWM")


def daemon_role(title: str, is_leader: bool) -> str:
    """A daemon process's role from its title (``taskomatic: shard 3/8`` -> ``shard 3``)."""
    if is_leader:
        return "supervisor"
    if title.startswith("taskomatic: "):
        name = title.removeprefix("taskomatic: ")
        if name.startswith("shard "):
            return "shard " + name.split()[1].split("/")[0]
        return name.split(" ")[0]
    if "resource_tracker" in title:
        return "resource tracker"
    return title[:40] or "?"


def peak_rss(members: list[ProcStat], role_of: Any) -> list[dict[str, Any]]:
    """[{role, pid, peak_rss_kb}] for the live members, ``role_of(pid, title)`` naming each."""
    rows = []
    for s in members:
        kb = peak_rss_kb(s.pid)
        if kb is None:
            continue
        rows.append({"role": role_of(s.pid, process_title(s.pid)), "pid": s.pid, "peak_rss_kb": kb})
    return sorted(rows, key=lambda r: (r["role"], r["pid"]))


# -- the tasks table ---------------------------------------------------------------

ORDER_CHECK_SQL = """
WITH ordered AS (
    SELECT id, key_type, key_id, state, time_started, time_ended,
           lag(time_ended) OVER w AS previous_end,
           lag(state) OVER w AS previous_state
    FROM tasks
    WINDOW w AS (PARTITION BY key_type, key_id ORDER BY id)
)
SELECT count(*) FILTER (WHERE previous_end > time_started) AS overlapping_or_reordered,
       count(*) FILTER (WHERE time_started IS NOT NULL AND previous_state IS NOT NULL
                        AND previous_end IS NULL) AS started_before_previous_ended,
       count(DISTINCT (key_type, key_id)) AS keys
FROM ordered
"""

TASK_ROWS_SQL = """
SELECT id, key_id, state, action, run_by_shard,
       extract(epoch FROM created_at)::float8 AS created,
       extract(epoch FROM claimed_at)::float8 AS claimed,
       extract(epoch FROM time_started)::float8 AS started,
       extract(epoch FROM time_ended)::float8 AS ended
FROM tasks ORDER BY id
"""


def order_check(conn: Any) -> dict[str, Any]:
    """Per-key order from SQL: for each key, in id order, every task started after the previous one ended."""
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(ORDER_CHECK_SQL)
        row = dict(cur.fetchone())
    conn.rollback()
    violations = int(row["overlapping_or_reordered"]) + int(row["started_before_previous_ended"])
    return {"violations": violations, "overlapping_or_reordered": int(row["overlapping_or_reordered"]),
            "started_before_previous_ended": int(row["started_before_previous_ended"]),
            "keys": int(row["keys"]), "ok": violations == 0}


def task_rows(conn: Any) -> list[dict[str, Any]]:
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(TASK_ROWS_SQL)
        rows = [dict(r) for r in cur.fetchall()]
    conn.rollback()
    return rows


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not sorted_values:
        return None
    pos = q * (len(sorted_values) - 1)
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def cdf_points(sorted_values: list[float], points: int = 200) -> list[list[float]]:
    """A compact CDF: [value, fraction <= value] at ``points`` evenly spaced fractions (and the max)."""
    if not sorted_values:
        return []
    n = len(sorted_values)
    out = []
    for i in range(points + 1):
        q = i / points
        value = percentile(sorted_values, q)
        assert value is not None
        out.append([round(value, 4), round(bisect.bisect_right(sorted_values, value) / n, 5)])
    return out


def busy_union(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None and current_start is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None and current_start is not None:
        total += current_end - current_start
    return total


def serial_ok(intervals: list[tuple[float, float]]) -> bool:
    """Do the intervals never overlap (one at a time)?"""
    previous_end = None
    for start, end in sorted(intervals):
        if previous_end is not None and start < previous_end:
            return False
        previous_end = end
    return True


def overlap_count(intervals: list[tuple[float, float]]) -> int:
    """How many intervals start before an earlier-starting one has ended (0 iff ``serial_ok``)."""
    count, latest_end = 0, None
    for start, end in sorted(intervals):
        if latest_end is not None and start < latest_end:
            count += 1
        latest_end = end if latest_end is None else max(latest_end, end)
    return count


# -- the per-shard utilisation timeline ------------------------------------------------

TIMELINE_MAX_INTERVALS = 2000  # per shard, in the JSON; closer busy intervals are merged beyond that
TIMELINE_MAX_POINTS = 4000  # of each step curve; beyond that, time-weighted means over equal bins


def merge_intervals(intervals: list[tuple[float, float]], gap: float = 0.0) -> list[tuple[float, float]]:
    """Sorted union of [start, end] intervals; intervals less than ``gap`` apart are joined too."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start - merged[-1][1] <= gap:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def step_curve(events: list[tuple[float, int]]) -> list[list[float]]:
    """[t, count after t] for +1/-1 events, one point per distinct time, starting at count 0.

    Events at one time are applied together (an end and a start at the same
    instant do not show as two tasks at once).
    """
    out: list[list[float]] = []
    count = 0
    for t, delta in sorted(events):
        count += delta
        if out and out[-1][0] == t:
            out[-1][1] = count
        else:
            out.append([t, count])
    return out


def bin_curve(points: list[list[float]], end: float, bins: int) -> list[list[float]]:
    """A step curve as [bin start, time-weighted mean over the bin] for ``bins`` equal bins of [0, end]."""
    if not points or end <= 0:
        return []
    width = end / bins
    sums = [0.0] * bins
    for i, (t, value) in enumerate(points):
        until = points[i + 1][0] if i + 1 < len(points) else end
        t, until = max(t, 0.0), min(until, end)
        b = min(int(t / width), bins - 1)
        while t < until and b < bins:
            bin_end = until if b == bins - 1 else min(until, (b + 1) * width)
            if bin_end > t:
                sums[b] += value * (bin_end - t)
                t = bin_end
            b += 1
    return [[round(b * width, 4), round(s / width, 4)] for b, s in enumerate(sums)]


def _compact(points: list[list[float]], end: float, max_points: int) -> tuple[list[list[float]], float | None]:
    if len(points) <= max_points:
        return [[round(t, 4), int(v)] for t, v in points], None
    bins = max_points // 2
    return bin_curve(points, end, bins), round(end / bins, 6)


def shard_of(row: dict[str, Any], shards: int, key_type: str = "Vm") -> tuple[int, bool]:
    """The shard slot that ran a task row, and whether the table recorded it.

    ``tasks.run_by_shard`` is the slot that marked the task running (the
    fetcher pins a key to whichever shard has room, so the key alone does not
    tell). Rows without it (results from before migration 0006, or tasks run
    by a baseline, which is not taskomatic) fall back to the old hash routing,
    ``router.shard_for(OrderingKey(key_type, key_id), shards)``. Slots are
    numbered per instance: this is for a standalone run (one instance); a
    multihost run's slots would have to be told apart by ``claimed_by``.
    """
    recorded = row.get("run_by_shard")
    if recorded is not None:
        return int(recorded), True
    from taskomatic.model import OrderingKey
    from taskomatic.runtime.router import shard_for

    return shard_for(OrderingKey(key_type, row["key_id"]), shards), False


def _attributed_by(from_hash: int, total: int) -> str:
    if from_hash == 0:
        return "tasks.run_by_shard"
    if from_hash == total:
        return "router.shard_for (no run_by_shard recorded)"
    return f"tasks.run_by_shard, router.shard_for for {from_hash} of {total} tasks with none recorded"


def shard_timeline(rows: list[dict[str, Any]], shards: int, key_type: str = "Vm",
                   max_intervals: int = TIMELINE_MAX_INTERVALS,
                   max_points: int = TIMELINE_MAX_POINTS) -> dict[str, Any] | None:
    """What the utilisation timeline plot shows, from task rows (``task_rows``).

    Times are seconds since the first ``created_at``. Each task that ran is
    attributed to the shard slot that marked it running, ``tasks.run_by_shard``
    (see ``shard_of``). ``consistent`` says whether no two tasks of one shard
    overlap and no task names a slot outside [0, shards) (``out_of_range``):
    a shard runs one task at a time, so for a taskomatic run it must hold,
    and ``False`` is a daemon bug (unless rows had no ``run_by_shard`` and
    were attributed by the old hash, which the daemon no longer routes by:
    ``attributed_by`` says which). Per shard: its busy intervals (merged
    where they touch, and, beyond ``max_intervals``, where they are closer
    than the window over ``max_intervals``: the JSON stays small, the plot
    loses nothing it could draw), and its busy seconds and task count
    (exact), and ``overlaps``: how many of its tasks started before an
    earlier one of it ended (0 when consistent). ``running``: tasks between
    time_started and time_ended; ``waiting``: between created_at and
    time_started; both step curves [t, count], or, with more than
    ``max_points`` points, time-weighted means over equal bins (``*_bin_s``).
    """
    ran = [r for r in rows if r["started"] is not None and r["ended"] is not None]
    if not ran:
        return None
    t0 = min(r["created"] for r in rows)
    end = max(r["ended"] for r in ran) - t0
    by_shard: dict[int, list[tuple[float, float]]] = defaultdict(list)
    from_hash = 0
    for r in ran:
        shard, recorded = shard_of(r, shards, key_type)
        from_hash += not recorded
        by_shard[shard].append((r["started"] - t0, r["ended"] - t0))
    # A slot outside [0, shards) cannot be (the run had ``shards`` slots): counted, never drawn.
    out_of_range = sum(len(v) for i, v in by_shard.items() if not 0 <= i < shards)
    overlaps = [overlap_count(by_shard.get(i, [])) for i in range(shards)]
    consistent = out_of_range == 0 and all(serial_ok(v) for v in by_shard.values())
    gap = 0.0
    if max(len(v) for v in by_shard.values()) > max_intervals:
        gap = end / max_intervals
    busy = []
    for i in range(shards):
        merged = merge_intervals(by_shard.get(i, []), gap)
        busy.append([[round(s, 4), round(e, 4)] for s, e in merged])
    running, running_bin = _compact(step_curve([(r["started"] - t0, 1) for r in ran]
                                               + [(r["ended"] - t0, -1) for r in ran]), end, max_points)
    waiting, waiting_bin = _compact(step_curve([(r["created"] - t0, 1) for r in ran]
                                               + [(r["started"] - t0, -1) for r in ran]), end, max_points)
    return {
        "shards": shards,
        "attributed_by": _attributed_by(from_hash, len(ran)),
        "attributed_by_hash": from_hash,
        "out_of_range": out_of_range,
        "consistent": consistent,
        "t0_epoch": t0,
        "end_s": round(end, 4),
        "first_start_s": round(min(r["started"] for r in ran) - t0, 4),
        "merge_gap_s": round(gap, 6),
        "busy": busy,
        "busy_s": [round(sum(e - s for s, e in by_shard.get(i, [])), 4) for i in range(shards)],
        "tasks_per_shard": [len(by_shard.get(i, [])) for i in range(shards)],
        "overlaps": overlaps,
        "running": running,
        "running_bin_s": running_bin,
        "waiting": waiting,
        "waiting_bin_s": waiting_bin,
    }
