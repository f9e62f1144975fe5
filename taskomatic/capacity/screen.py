"""``taskomatic plan``'s answer: one screen of text, or one JSON document (the CLI's convention)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from taskomatic.capacity.fleet import FleetPlan, row_json
from taskomatic.capacity.model import model_name


def _s(value: float | None) -> str:
    if value is None:
        return "inf"  # utilisation >= 1: the queue grows without bound
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def _ms(seconds: float) -> str:
    ms = seconds * 1000.0
    return f"{ms:,.0f}" if ms >= 10 else f"{ms:.2f}"


def _n(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def request_bucket(inputs: Any) -> str:
    seconds = inputs.bucket_s
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def render(fleet: FleetPlan, since: dt.datetime | None, until: dt.datetime) -> str:
    inputs, request, result = fleet.inputs, fleet.request, fleet.result
    w = inputs.workload
    lines = []
    if since is not None:
        lines.append(f"History: {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC: {inputs.measured_tasks:,} "
                     f"tasks, {len(inputs.actions)} actions, {inputs.keys_measured:,} keys")
        if inputs.mean_per_hour is not None and inputs.peak_per_hour is not None:
            lines.append(f"  arrivals {_n(inputs.mean_per_hour)}/h on average, {_n(inputs.peak_per_hour)}/h in the "
                         f"busiest {request_bucket(inputs)}")
    keys = f"measured, {len(w.key_shares):,}" if w.key_shares else f"modelled, {w.vms:,} VMs {w.skew}"
    growth = f" x growth {request.growth:g}" if request.growth != 1 else ""
    lines += [
        f"Planned load: {_n(inputs.base_per_hour)} tasks/h ({inputs.rate_source}){growth} = "
        f"{w.rate_per_s * 3600:,.0f} tasks/h;",
        f"  mean run {result.service.mean_s:.3g} s (cv "
        f"{result.service.cv:.2f}) = {result.offered_load:.2f} shards busy on average",
        f"Keys: {keys}; per-task overhead {w.overhead_s * 1000:.2f} ms ({request.overhead_source})",
        f"Target: p95 wait from submission to start <= {request.target_p95_s:g} s; routing {result.routing}"
        + (f" (each shard its own queue: partition = hash(key) mod {result.partitions}, shard = partition mod N)"
           if result.routing == "hash" else " (the shards one pool, each key its own queue)"),
        "",
    ]
    if result.shards is not None:
        set_by = (f"; the hottest key sets it, the pool alone needs {result.pool_shards}"
                  if result.pool_shards is not None and result.pool_shards < result.shards else "")
        lines.append(f"ANSWER: {result.shards} shard{'s' * (result.shards != 1)} = {fleet.instances} "
                     f"instance{'s' * (fleet.instances != 1)} x {fleet.shards_per_instance} "
                     f"shard{'s' * (fleet.shards_per_instance != 1)} "
                     f"(--shards {fleet.shards_per_instance}; at most {request.shards_per_instance} per instance)"
                     f"{set_by}")
    else:
        lines.append(f"ANSWER: {result.verdict}")
    at = f" at {fleet.at_shards} shards" if fleet.at_shards is not None else ""
    lines += ["", f"{'action':<16} {'tasks/h':>9} {'share':>6} {'run ms':>8} {'sd ms':>8} {'p95 wait now s':>14} "
                  f"{'mean wait s':>11} {'p95 wait s':>10}{at}"]
    for a in fleet.action_waits:
        now = a["measured_wait_p95_s"]
        lines.append(f"{a['action']:<16} {_n(a['tasks_per_hour']):>9} {a['share']:>6.0%} {_ms(a['run_mean_s']):>8} "
                     f"{_ms(a['run_sd_s']):>8} {'-' if now is None else _s(now):>14} {_s(a['mean_wait_s']):>11} "
                     f"{_s(a['p95_wait_s']):>10}")
    lines += ["", f"Hot keys (a key runs one task at a time: no shard count shortens its own queue; any one key "
                  f"can take at most {_n(fleet.key_max_per_hour)} tasks/h and meet the target):",
              f"{'key':<22} {'tasks/h':>9} {'utilisation':>11} {'p95 own queue':>13} {'p95 wait':>9}"]
    for k in fleet.hot_keys:
        lines.append(f"{k['key']:<22} {_n(k['tasks_per_hour']):>9} {k['utilisation']:>11.3f} "
                     f"{_s(k['p95_wait_alone_s']):>13} {_s(k['p95_wait_s']):>9}")
    if fleet.hot_keys and fleet.hot_keys[0]["tasks_per_hour"] > 0:
        lines.append(f"  the hottest key has {fleet.key_max_per_hour / fleet.hot_keys[0]['tasks_per_hour']:.1f}x "
                     "headroom before its own queue alone misses the target")
    pool_column = "busiest p95 s" if result.routing == "hash" else "pool p95 s"
    lines += ["", f"{'shards':>6} {'inst':>4} {'util':>5} {'P(wait)':>7} {pool_column:>10} "
                  f"{'hot key p95 s':>13} {'all p95 s':>9}  meets"]
    for row in result.rows[-4:]:  # the search stops at the answer: the counts just below it show why
        lines.append(f"{row.shards:>6} {row.instances:>4} {row.utilisation:>5.2f} {row.wait_probability:>7.3f} "
                     f"{_s(row.pool_p95_wait_s):>10} {_s(row.hottest_key_p95_wait_s):>13} "
                     f"{_s(row.overall_p95_wait_s):>9}  {'yes' if row.meets_target else 'no: ' + str(row.limited_by)}")
    lines.append(f"Model ({result.routing} routing): {model_name(result.routing)} (README: Capacity planning)")
    return "\n".join(lines)


def document(fleet: FleetPlan, since: dt.datetime | None, until: dt.datetime) -> dict[str, Any]:
    """The plan as one JSON document: times ISO 8601 UTC, durations in seconds, numbers as numbers."""
    inputs, request, result = fleet.inputs, fleet.request, fleet.result
    w = inputs.workload
    return {
        "generated_at": dt.datetime.now(dt.UTC),
        "history": None if since is None else {
            "since": since, "until": until, "tasks": inputs.measured_tasks, "keys": inputs.keys_measured,
            "window_s": inputs.window_s, "mean_per_hour": inputs.mean_per_hour,
            "peak_per_hour": inputs.peak_per_hour, "peak_bucket_start": inputs.peak_bucket_start,
            "actions": inputs.actions},
        "inputs": {
            "base_per_hour": inputs.base_per_hour, "rate_source": inputs.rate_source, "growth": request.growth,
            "tasks_per_hour": w.tasks_per_hour, "run_mean_s": w.latency_s, "run_sd_s": w.latency_sd_s,
            "overhead_s": w.overhead_s, "overhead_source": request.overhead_source,
            "keys": "measured" if w.key_shares else {"vms": w.vms, "skew": w.skew},
            "service_mean_s": result.service.mean_s, "service_cv": result.service.cv,
            "offered_load": result.offered_load},
        "target_p95_s": request.target_p95_s,
        "answer": {"shards": result.shards, "instances": fleet.instances,
                   "shards_per_instance": fleet.shards_per_instance,
                   "max_shards_per_instance": request.shards_per_instance, "pool_shards": result.pool_shards,
                   "possible": result.shards is not None, "verdict": result.verdict},
        "waits_at_shards": fleet.at_shards,
        "actions": fleet.action_waits,
        "hot_keys": fleet.hot_keys,
        "key_max_per_hour": fleet.key_max_per_hour,
        "rows": [row_json(r) for r in result.rows],
        "routing": result.routing,
        "partitions": result.partitions,
        "model": model_name(result.routing),
    }
