"""The figures of one ``bench.run`` run from the tasks table, and each run's ratios to the baselines.

Everything here reads what a run left in the tasks table (``bench.measure.task_rows``
and ``order_check``) or the runs' JSON; see bench/README.md, "Figures".
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from bench import lifecycle, measure
from bench.commit_probe import chain_links
from bench.runners import RunnerSpec
from bench.workloads import PlannedTask, Workload, lower_bound, measured_work_stats, work_stats


def analyse(conn: Any, workload: Workload, tasks: list[PlannedTask], spec: RunnerSpec,
            close: bool = False, commits: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
    """Every figure that comes from the tasks table (``commits``: the commit probe's timed samples, if it ran)."""
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
    # Where enqueue-to-start goes, for runners that record the claim (claimed_at: the daemon's claim
    # statement): from the insert to the claim, and from the claim to the action's start.
    claimed = [r for r in ran if r.get("claimed") is not None and r["created"] <= r["claimed"] <= r["started"]]
    if claimed:
        to_claim = sorted((r["claimed"] - r["created"]) * 1000.0 for r in claimed)
        to_start = sorted((r["started"] - r["claimed"]) * 1000.0 for r in claimed)
        out["latency_split_ms"] = {"tasks": len(claimed),
                                   "to_claim_p50": _round(measure.percentile(to_claim, 0.50)),
                                   "to_claim_p99": _round(measure.percentile(to_claim, 0.99)),
                                   "claim_to_start_p50": _round(measure.percentile(to_start, 0.50)),
                                   "claim_to_start_p99": _round(measure.percentile(to_start, 0.99))}
    if workload.latency == "noop" and workload.key_distribution == "zipf" and spec.keeps_order:
        # The hottest key's chain: its links while other keys still ran, and once it ran alone.
        out["chain_links"] = chain_links(ran, commits)
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
        out["utilisation"].update(per_shard(ran, spec.parallelism, first_start, span))
        if workload.has_work and not workload.work_measured and len(ran) == len(rows):
            out["makespan_parts"] = makespan_parts(ran, spec.parallelism, stats.total_s, first_created, last_end,
                                                   out.get("lower_bound_s"))
        if workload.has_work:
            # The busy intervals per shard and the tasks running over time, for the timeline plot.
            out["timeline"] = measure.shard_timeline(rows, spec.parallelism)
    return out


def per_shard(ran: list[dict[str, Any]], shards: int, first_start: float, span: float) -> dict[str, Any]:
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


def makespan_parts(ran: list[dict[str, Any]], shards: int, planned_s: float, first_created: float,
                   last_end: float, bound_s: float | None) -> dict[str, Any] | None:
    """Where a burst's makespan goes beyond its planned work, per shard on average (seconds).

    For each shard, makespan = (its first start - the first insert) + its tasks' run times + the gaps
    between its tasks (one's end to the next one's start: the commit that ends one and starts the
    next, and the messages around it) + (the last end of all - its last end). Averaged over the
    shards, the run times are the planned work / shards plus how much longer the actions ran than
    planned (``overrun_s``). So makespan = planned / shards + start_s + overrun_s + gaps_s + end_idle_s,
    exactly; ``over_bound_s`` is the makespan minus its lower bound. The gaps are also given one by
    one (ms). None unless every task records its shard (tasks.run_by_shard).
    """
    by_shard: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in ran:
        if r.get("run_by_shard") is None:
            return None
        by_shard[int(r["run_by_shard"])].append(r)
    gaps_ms: list[float] = []
    start = gaps = end_idle = run = 0.0
    for tasks in by_shard.values():
        tasks.sort(key=lambda r: r["started"])
        start += tasks[0]["started"] - first_created
        end_idle += last_end - tasks[-1]["ended"]
        run += sum(r["ended"] - r["started"] for r in tasks)
        for before, after in itertools.pairwise(tasks):
            gaps += after["started"] - before["ended"]
            gaps_ms.append((after["started"] - before["ended"]) * 1000.0)
    gaps_ms.sort()
    makespan = last_end - first_created
    return {
        "shards_used": len(by_shard), "planned_per_shard_s": round(planned_s / shards, 4),
        "start_s": round(start / shards, 4), "overrun_s": round((run - planned_s) / shards, 4),
        "gaps_s": round(gaps / shards, 4), "end_idle_s": round(end_idle / shards, 4),
        # Shards that ran nothing count as idle throughout: their share is here.
        "unused_s": round(makespan * (shards - len(by_shard)) / shards, 4),
        "over_bound_s": round(makespan - bound_s, 4) if bound_s is not None else None,
        "gap_ms": {"count": len(gaps_ms), "p50": _round(measure.percentile(gaps_ms, 0.5)),
                   "mean": _round(sum(gaps_ms) / len(gaps_ms)) if gaps_ms else None,
                   "p90": _round(measure.percentile(gaps_ms, 0.9))},
    }


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
