"""What ``bench.bounded`` concludes and shows: the verdicts (pure), the analysis of the samples, the PNG and
the printed summary (``python -m bench.bounded --replot`` re-renders the last two from a bounded.json)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import style
from bench.bounded_memory import role_kind

SHARD_TARGET_MB = 30.0  # issue 5: <= 30 MB RSS per shard
LEVEL_REL = 0.05  # memory levels off: last half's peak within 5 % ...
LEVEL_ABS_KB = 2048  # ... or 2 MB of the first half's peak
SLOWDOWN_RATIO = 0.9  # the backlog slows claiming if the last third's rate < 0.9 x the first third's


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


HELD_COLOUR = "#e377c2"  # not a system colour: tasks held is a count, not a runner


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    style.setup(matplotlib)
    import matplotlib.pyplot as plt

    samples = results["samples"]
    fig, (ax_mem, ax_tps) = plt.subplots(2, 1, figsize=(11, 8.5), sharex=True)
    shard_seen = False
    for role in results["memory"]:
        ts = [s["t"] for s in samples if role in s["procs"]]
        is_shard = role_kind(role) == "shard"
        # Every shard is one colour (they overlap); one legend entry for them all.
        label = ("shards RSS" if not shard_seen else None) if is_shard else f"{role} RSS"
        shard_seen = shard_seen or is_shard
        ax_mem.plot(ts, [s["procs"][role][0] / 1024 for s in samples if role in s["procs"]],
                    color=style.role_colour(role), label=label)
        ax_mem.plot(ts, [s["procs"][role][2] / 1024 for s in samples if role in s["procs"]], linestyle="--",
                    color=style.role_colour(role), linewidth=0.8)
    ax_mem.axhline(SHARD_TARGET_MB, color=style.TARGET_COLOUR, linestyle=":", linewidth=1, label="30 MB shard target")
    ax_mem.set_ylabel("MB (solid RSS, dashed USS)")
    ax_mem.set_title(f"taskomatic {results['settings']['shards']} shards, "
                     f"{results['settings']['tasks']:,} queued noop tasks: memory per process")
    ax_mem.legend(ncol=3, loc="lower right")
    ax_mem.grid(alpha=0.3)
    windows = results["throughput"]["windows"]
    if windows:
        xs, ys = [], []
        for a, b, r in windows:
            xs += [a, b]
            ys += [r, r]
        ax_tps.plot(xs, ys, color=style.colour("taskomatic", "taskomatic"), label="tasks ended / s")
    ax_tps.set_ylabel("tasks ended per second")
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
    ax_held.plot([s["t"] for s in samples], [s["held"] for s in samples], color=HELD_COLOUR, linewidth=0.8,
                 label="held by the instance")
    ax_held.axhline(results["claim_capacity"]["capacity"], color=HELD_COLOUR, linestyle=":", linewidth=1,
                    label="claim capacity")
    ax_held.set_ylabel("tasks held by the instance")
    ax_held.set_ylim(bottom=0, top=results["claim_capacity"]["capacity"] * 1.15)
    ax_tps.set_title("throughput (windows) and tasks held")
    ax_tps.set_ylim(bottom=0)
    handles = ax_tps.get_legend_handles_labels()
    held_handles = ax_held.get_legend_handles_labels()
    ax_tps.legend(handles[0] + held_handles[0], handles[1] + held_handles[1], loc="lower right")
    fig.tight_layout()
    style.save(fig, path)


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


