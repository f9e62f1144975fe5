"""The soak's verdicts (``bench/soak.py``), as pure functions of the samples.

A *series* is a list of ``(t, value)`` pairs, ``t`` in seconds, sorted by
``t``. The verdicts look at the **load window** (from the first task queued
to the moment every task had ended), split into three equal thirds of time:
the first third holds the warm-up (imports, caches, the first connections),
so a process's behaviour over the long run is read from the middle and the
last third.

**Memory that does not level off** (:func:`memory_verdict`): a process is
flagged ``growing`` when, in its last third, it is both

* still reaching new highs: the last third's peak RSS exceeds the middle
  third's peak by more than the tolerance, and
* still climbing: the least-squares slope of its RSS over the last third,
  times the last third's length (the growth that slope accounts for over the
  last third), exceeds the tolerance.

The tolerance is max(``rel_tolerance`` of the middle third's peak,
``abs_tolerance_kb``): 2 % and 1 MiB by default. A series that levels off
(a warm-up ramp, then flat or a saw-tooth of allocations and frees) has a
last-third peak no higher than the middle third's, or a flat last third; a
leak proportional to the tasks run (steady arrival: to time) keeps both the
new highs and the slope. Both conditions are needed: a single late spike
makes a new high but no sustained slope, and noise makes a slope but no new
high above the tolerance.

**Leaked connections** (:func:`connection_verdict`): a count of open
connections (PostgreSQL backends of the daemon, client sockets of a libvirt
node) is *steady* over the middle third (its median; its max is the
ceiling). It leaks when the count **at the end** (the last sample, taken
while the daemon still runs, idle, after every task ended) is above the
middle third's maximum, or when the last third's median is above the middle
third's: a count that grows with the tasks run. Transients (a connection
closed and reopened between two samples) move a max, not a median, and are
gone by the end.

**Backlog** (:func:`backlog_verdict`): at the end no task is queued or
running, and the ended count equals the number queued.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

Series = list[tuple[float, float]]

REL_TOLERANCE = 0.02
ABS_TOLERANCE_KB = 1024.0
MIN_SAMPLES_PER_THIRD = 3


def slope(points: Series) -> float | None:
    """Least-squares slope (value per second) of the points; None with fewer than 2 distinct times."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def window(points: Series, start: float, end: float) -> Series:
    """The points with start <= t <= end."""
    return [(t, v) for t, v in points if start <= t <= end]


def thirds(points: Series, start: float | None = None, end: float | None = None) -> tuple[Series, Series, Series]:
    """The points of [start, end] (default: the series' own span) in three equal thirds of time."""
    if not points:
        return [], [], []
    start = points[0][0] if start is None else start
    end = points[-1][0] if end is None else end
    third = (end - start) / 3.0
    a, b = start + third, start + 2 * third
    return ([(t, v) for t, v in points if start <= t < a], [(t, v) for t, v in points if a <= t < b],
            [(t, v) for t, v in points if b <= t <= end])


def memory_verdict(points: Series, start: float | None = None, end: float | None = None,
                   rel_tolerance: float = REL_TOLERANCE, abs_tolerance_kb: float = ABS_TOLERANCE_KB,
                   min_samples: int = MIN_SAMPLES_PER_THIRD) -> dict[str, Any]:
    """RSS (kB) of one process over the load window [start, end]: does it level off? (see the module doc)."""
    inside = window(points, start if start is not None else float("-inf"), end if end is not None else float("inf"))
    first, middle, last = thirds(inside, start, end)
    out: dict[str, Any] = {"samples": len(inside), "start_kb": None, "peak_kb": None, "end_kb": None,
                           "middle_peak_kb": None, "last_peak_kb": None,
                           "middle_slope_kb_per_min": None, "last_slope_kb_per_min": None,
                           "last_third_growth_kb": None, "tolerance_kb": None, "growing": None,
                           "enough_samples": False, "why": None}
    if inside:
        out.update(start_kb=inside[0][1], peak_kb=max(v for _, v in inside), end_kb=inside[-1][1])
    if min(len(first), len(middle), len(last)) < min_samples:
        out["why"] = f"fewer than {min_samples} samples in a third of the load window: no verdict"
        return out
    mid_peak, last_peak = max(v for _, v in middle), max(v for _, v in last)
    mid_slope, last_slope = slope(middle), slope(last)
    last_span = last[-1][0] - last[0][0]
    growth = (last_slope or 0.0) * last_span
    tolerance = max(rel_tolerance * mid_peak, abs_tolerance_kb)
    new_high = last_peak - mid_peak > tolerance
    climbing = growth > tolerance
    growing = new_high and climbing
    out.update(middle_peak_kb=mid_peak, last_peak_kb=last_peak,
               middle_slope_kb_per_min=round(mid_slope * 60, 1) if mid_slope is not None else None,
               last_slope_kb_per_min=round(last_slope * 60, 1) if last_slope is not None else None,
               last_third_growth_kb=round(growth, 1), tolerance_kb=round(tolerance, 1), growing=growing,
               enough_samples=True)
    if growing:
        out["why"] = (f"last third peaks {last_peak - mid_peak:.0f} kB above the middle third and still climbs "
                      f"{growth:.0f} kB over it (tolerance {tolerance:.0f} kB)")
    elif new_high:
        out["why"] = "a new high in the last third, but no sustained climb: levelled off"
    else:
        out["why"] = "no new high in the last third: levelled off"
    return out


def connection_verdict(points: Series, start: float | None = None, end: float | None = None,
                       final: float | None = None, min_samples: int = MIN_SAMPLES_PER_THIRD) -> dict[str, Any]:
    """A connection count over the load window: steady state, the count at the end, and whether it leaked.

    ``final``: the count at the end (default: the last point of the whole series, which the soak takes
    while the daemon is idle after the backlog drained).
    """
    inside = window(points, start if start is not None else float("-inf"), end if end is not None else float("inf"))
    _, middle, last = thirds(inside, start, end)
    at_end = final if final is not None else (points[-1][1] if points else None)
    out: dict[str, Any] = {"samples": len(inside), "steady": None, "steady_max": None, "last_third_median": None,
                           "peak": max((v for _, v in points), default=None), "end": at_end, "leaked": None,
                           "enough_samples": False, "why": None}
    if min(len(middle), len(last)) < min_samples or at_end is None:
        out["why"] = f"fewer than {min_samples} samples in the middle or last third: no verdict"
        return out
    steady = statistics.median(v for _, v in middle)
    steady_max = max(v for _, v in middle)
    last_median = statistics.median(v for _, v in last)
    above_at_end = at_end > steady_max
    trend = last_median > steady
    out.update(steady=steady, steady_max=steady_max, last_third_median=last_median, leaked=above_at_end or trend,
               enough_samples=True)
    if above_at_end:
        out["why"] = f"{at_end:g} open at the end, above the steady state's maximum {steady_max:g}"
    elif trend:
        out["why"] = f"grows with the tasks: last third's median {last_median:g} above the middle third's {steady:g}"
    else:
        out["why"] = f"{at_end:g} at the end, steady {steady:g} (max {steady_max:g})"
    return out


def backlog_verdict(inserted: int, queued: int, running: int, ended: int) -> dict[str, Any]:
    """At the end: nothing queued or running, and every task queued has ended."""
    unsettled = queued + running
    ok = unsettled == 0 and ended == inserted
    return {"inserted": inserted, "queued": queued, "running": running, "ended": ended, "unsettled": unsettled,
            "ok": ok}


def restarts(pids: dict[str, list[int]]) -> dict[str, int]:
    """Role -> how many times its pid changed over the samples (a respawned shard, a restarted fetcher)."""
    out = {}
    for role, seen in pids.items():
        changes = sum(1 for a, b in itertools.pairwise(seen) if a != b)
        if changes:
            out[role] = changes
    return out


# -- latency figures (from the task rows: key_id, created, started, ended epoch seconds) --------------


def ready_times(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Task id -> when it could start at the earliest: its ``created``, or the end of its key's previous
    task (per-key order) if that is later. A task's wait after that is the scheduler's, not its key's."""
    by_key: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(r["key_id"], []).append(r)
    ready = {}
    for key_rows in by_key.values():
        previous_end: float | None = None
        for r in sorted(key_rows, key=lambda r: r["id"]):
            ready[r["id"]] = r["created"] if previous_end is None else max(r["created"], previous_end)
            previous_end = r["ended"] if r["ended"] is not None else previous_end
    return ready


def latency_over_time(rows: list[dict[str, Any]], t0: float, buckets: int = 40) -> list[dict[str, Any]]:
    """Per window of creation time (``buckets`` equal windows from ``t0``): tasks, and p50/p99/max of
    queue-to-start and of ready-to-start waits, ms. A soak's latency should not drift up over time."""
    ran = [r for r in rows if r["started"] is not None and r["ended"] is not None]
    if not ran:
        return []
    ready = ready_times(rows)
    end = max(r["created"] for r in ran) - t0
    width = end / buckets if end > 0 else 1.0
    groups: list[list[dict[str, Any]]] = [[] for _ in range(buckets)]
    for r in ran:
        groups[min(int((r["created"] - t0) / width), buckets - 1)].append(r)
    out = []
    for i, group in enumerate(groups):
        if not group:
            continue
        waits = sorted((r["started"] - r["created"]) * 1000.0 for r in group)
        after_ready = sorted(max(0.0, r["started"] - ready[r["id"]]) * 1000.0 for r in group)
        out.append({"from_s": round(i * width, 1), "tasks": len(group),
                    "wait_p50_ms": round(_pct(waits, 0.5), 1), "wait_p99_ms": round(_pct(waits, 0.99), 1),
                    "wait_max_ms": round(waits[-1], 1),
                    "ready_wait_p50_ms": round(_pct(after_ready, 0.5), 1),
                    "ready_wait_p99_ms": round(_pct(after_ready, 0.99), 1),
                    "ready_wait_max_ms": round(after_ready[-1], 1)})
    return out


def longest_ready_waits(rows: list[dict[str, Any]], t0: float, top: int = 10) -> list[dict[str, Any]]:
    """The tasks that waited longest after they were ready, and how many tasks created after them (on
    other keys, necessarily) started before them: ``overtaken_by``, a measure of unfairness."""
    ran = [r for r in rows if r["started"] is not None and r["ended"] is not None]
    ready = ready_times(rows)
    worst = sorted(ran, key=lambda r: r["started"] - ready[r["id"]], reverse=True)[:top]
    out = []
    for r in worst:
        overtaken = sum(1 for o in ran if o["created"] > r["created"] and o["started"] < r["started"])
        out.append({"id": r["id"], "key_id": r["key_id"], "action": r.get("action"),
                    "created_s": round(r["created"] - t0, 3), "ready_s": round(ready[r["id"]] - t0, 3),
                    "started_s": round(r["started"] - t0, 3),
                    "ready_wait_s": round(r["started"] - ready[r["id"]], 3), "overtaken_by": overtaken})
    return out


def _pct(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


__all__ = ["backlog_verdict", "connection_verdict", "latency_over_time", "longest_ready_waits", "memory_verdict",
           "ready_times", "restarts", "slope", "thirds", "window"]


# -- every verdict of one run --------------------------------------------------------------------------


def _series(t: list[float], values: list[Any]) -> Series:
    return [(a, float(v)) for a, v in zip(t, values, strict=True) if v is not None]


def compute_verdicts(columns: dict[str, Any], load_end: float, final: dict[str, Any] | None,
                     inserted: int) -> dict[str, Any]:
    """Every verdict from the samples (see bench/soak_py for the definitions)."""
    t = columns["t"]
    memory = {role: memory_verdict(_series(t, values), 0.0, load_end)
              for role, values in columns["rss_kb"].items()}
    nodes_memory = {node: memory_verdict(_series(t, values), 0.0, load_end)
                    for node, values in columns["libvirtd_rss_kb"].items()}
    # A connection name absent from a sample had 0 connections then.
    pg = {name: connection_verdict([(a, float(v or 0)) for a, v in zip(t, values, strict=True)], 0.0,
                                            load_end)
          for name, values in columns["pg"].items()}
    pg_total = connection_verdict(_series(t, columns["pg_total"]), 0.0, load_end)
    libvirt = {node: connection_verdict(_series(t, values), 0.0, load_end)
               for node, values in columns["libvirt"].items()}
    final = final or {"queued": -1, "running": -1, "ended": -1}
    backlog = backlog_verdict(inserted, final["queued"], final["running"], final["ended"])
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
        "restarts": restarts(pids),
    }


def verdicts_ok(v: dict[str, Any]) -> bool:
    """Did every verdict of a run (with its order and lifecycle checks added) hold?"""
    return bool(v.get("memory_ok") and v.get("connections_ok") and v.get("backlog", {}).get("ok")
                and not v.get("restarts") and v.get("order", {}).get("ok") and v.get("lifecycle", {}).get("ok"))



def verdict_flags(v: dict[str, Any]) -> dict[str, bool]:
    """Each verdict as one boolean (what the summary and the exit code go by)."""
    return {"memory levels off": bool(v.get("memory_ok")),
            "no leaked connections": bool(v.get("connections_ok")),
            "backlog 0, ended == queued": bool(v.get("backlog", {}).get("ok")),
            "no process restarted": not v.get("restarts"),
            "per-key order": bool(v.get("order", {}).get("ok")),
            "every task ended once, VM rows match the domains": bool(v.get("lifecycle", {}).get("ok"))}

