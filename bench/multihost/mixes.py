"""4. Workloads over instances: the same setups as the scaling runs (standalone and 1..3 multihost
instances, each routing), on the workloads the routing choice depends on: Zipf keys, 20 ms tasks and a
heavy tail. Throughput and makespan against the lower bound of each setup's shards, side by side in one
run (issue 13: "--routing hash and --routing pinned both reported for the uniform, Zipf and heavy-tailed
workloads, standalone and multihost")."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from bench.multihost.scaling import run_scaling, scaling_summary
from bench.multihost.suite import SHARDS, Ctx, Plan
from bench.workloads import Workload, generate, lower_bound, work_stats


def mix_workloads(plan: Plan) -> list[Workload]:
    """No-op Zipf (the uniform no-op is the scaling run), 20 ms uniform and Zipf, the heavy tail (20 ms,
    5 % of tasks at 50x) over uniform keys."""
    n, keys, timed = plan.scale_tasks, plan.scale_keys, plan.mix_timed_tasks
    every = [
        Workload("noop-zipf", n, keys, key_distribution="zipf"),
        Workload("fixed20-uniform", timed, keys, latency="fixed", base_ms=20),
        Workload("fixed20-zipf", timed, keys, key_distribution="zipf", latency="fixed", base_ms=20),
        Workload("heavy-uniform", timed, keys, latency="heavy", base_ms=20),
    ]
    return [w for w in every if not plan.mix_names or w.name in plan.mix_names]


def run_mix(ctx: Ctx, plan: Plan, workload: Workload, count: int, multihost: bool, routing: str, seed: int,
            rep: int) -> dict[str, Any]:
    """One setup on one workload: the scaling run's figures, plus the makespan against its lower bound."""
    tasks = generate(workload, seed)
    result = run_scaling(ctx, plan, count, multihost, routing, rep, tasks)
    result["workload"] = workload.name
    if workload.has_work:
        shards = count * SHARDS
        bound = lower_bound(work_stats(tasks), shards)
        result["lower_bound_s"] = round(bound, 3)
        makespan = result.get("makespan_s")
        result["makespan_ratio"] = round(makespan / bound, 3) if makespan and bound else None
    return result


def mix_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload: the scaling summary of its setups (ratios to its own standalone), with makespans."""
    by_workload: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_workload[r["workload"]].append(r)
    out = []
    for name, rows in by_workload.items():
        for s in scaling_summary(rows):
            mine = [r for r in rows if r["setup"] == s["setup"]]
            ratios = sorted(r["makespan_ratio"] for r in mine if r.get("makespan_ratio") is not None)
            makespans = sorted(r["makespan_s"] for r in mine if r.get("makespan_s") is not None)
            out.append({**s, "workload": name,
                        "makespan_s": makespans[len(makespans) // 2] if makespans else None,
                        "makespan_ratio": ratios[len(ratios) // 2] if ratios else None})
    return out
