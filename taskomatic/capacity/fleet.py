"""Planning from a fleet's own history: the tasks table's figures as the planner's inputs, and the answer's
details an operator reads (waits per action, the hot keys).

:func:`inputs_from_history` turns a :class:`~taskomatic.db.history.History` (what was submitted, per action
and per key, and how long each action ran) plus the operator's what-ifs (:class:`Request`: growth, another
rate or mix, a latency for an action never seen) into a :class:`~taskomatic.capacity.model.Workload` whose
keys are the measured keys, not a modelled skew. :func:`make_plan` runs the model's search
(``taskomatic.capacity.model.plan``) and adds, at the answer, every action's expected wait and the hottest
keys' limits. Pure: no database here (``taskomatic/db/history.py`` reads it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from taskomatic.capacity import hashing
from taskomatic.capacity.model import Plan, PlanError, Row, Workload, key_groups, key_label, key_rates, plan
from taskomatic.capacity.queueing import Wait, max_key_rate, mgc_wait, mixture_p95, sum_quantile
from taskomatic.db.history import History

# The per-task overhead when no bench result is given: the largest of the full suite of 2026-11-25
# (bench/RESULTS/results-2026-11-25.json.gz, sleep20-uniform at 16 shards on 2 cores). Real actions
# take seconds, so it rarely matters.
DEFAULT_OVERHEAD_MS = 3.99
HOT_KEYS_SHOWN = 5


@dataclass(frozen=True)
class Request:
    """What the operator asks: the target, the what-ifs over the history, the search's bounds."""

    target_p95_s: float
    overhead_s: float
    overhead_source: str
    growth: float = 1.0
    rate_basis: str = "peak"  # "peak": the busiest bucket's rate; "mean": over the window
    total_per_hour: float | None = None  # replaces the measured rate (the mix stays)
    tasks_per_hour: dict[str, float] = field(default_factory=dict)  # replaces the rate and the mix
    mix: dict[str, float] = field(default_factory=dict)  # replaces the mix (weights; the rate stays)
    latency_s: dict[str, float] = field(default_factory=dict)  # replaces a measured run time
    latency_cv: float = 1.0  # for latencies given here, as sd / mean
    vms: int | None = None  # model the keys (vms, skew) instead of the measured ones
    skew: str = "uniform"
    shards_per_instance: int = 8
    max_shards: int = 256
    routing: str = "pinned"  # the daemon's --routing to plan for


@dataclass
class Inputs:
    """The planner's inputs and where each came from."""

    workload: Workload
    measured_tasks: int = 0
    window_s: float = 0.0
    bucket_s: float = 3600.0
    mean_per_hour: float | None = None
    peak_per_hour: float | None = None
    peak_bucket_start: Any = None
    base_per_hour: float = 0.0  # the rate the plan starts from, before growth
    rate_source: str = ""
    actions: list[dict[str, Any]] = field(default_factory=list)  # measured per action
    keys_measured: int = 0
    action_key_weights: dict[str, dict[str, float]] = field(default_factory=dict)


def inputs_from_history(history: History | None, request: Request) -> Inputs:
    """The workload to plan for: the history's rate, mix, run times and keys, with the request's what-ifs."""
    if request.growth <= 0:
        raise PlanError("--growth must be > 0")
    inputs = Inputs(workload=Workload({}, {}, request.latency_cv, request.overhead_s, 1, "uniform"))
    measured_share: dict[str, float] = {}
    latency: dict[str, float] = {}
    latency_sd: dict[str, float] = {}
    key_totals: dict[str, float] = {}
    if history is not None:
        total = int(history.window.get("tasks") or 0)
        inputs.measured_tasks, inputs.bucket_s = total, history.bucket_s
        # The mean counts whole buckets from the first one with a task (or the window's start), so it is
        # never above the busiest bucket's rate.
        first = history.buckets[0]["bucket_start"] if history.buckets else None
        start = max(history.since, first) if first is not None else history.since
        buckets = max(1, math.ceil((history.until - start).total_seconds() / history.bucket_s))
        inputs.window_s = buckets * history.bucket_s
        if total:
            inputs.mean_per_hour = total / inputs.window_s * 3600.0
            peak = max(history.buckets, key=lambda b: (int(b["tasks"]), -b["bucket_start"].timestamp()))
            inputs.peak_per_hour = int(peak["tasks"]) / history.bucket_s * 3600.0
            inputs.peak_bucket_start = peak["bucket_start"]
        for row in history.actions:
            action, count = str(row["action"]), int(row["tasks"])
            measured_share[action] = count / total if total else 0.0
            if row["run_mean_s"] is not None:
                latency[action] = float(row["run_mean_s"])
                latency_sd[action] = float(row["run_sd_s"] or 0.0)
            inputs.actions.append(dict(row))
        for row in history.key_actions:
            label = f"{row['key_type']}:{row['key_id']}"
            key_totals[label] = key_totals.get(label, 0.0) + int(row["tasks"])
            weights = inputs.action_key_weights.setdefault(str(row["action"]), {})
            weights[label] = weights.get(label, 0.0) + int(row["tasks"])
        inputs.keys_measured = len(key_totals)
    per_hour = _planned_rates(inputs, request, measured_share)
    for action, value in request.latency_s.items():
        latency[action] = value
        latency_sd[action] = request.latency_cv * value
    unknown = sorted(a for a, n in per_hour.items() if n > 0 and a not in latency)
    if unknown:
        raise PlanError(f"no run time for {', '.join(unknown)}: no task of it ended in the window; give "
                        f"--latency {unknown[0]}=SECONDS")
    if request.vms is None and not key_totals:
        raise PlanError("no tasks in the window to take the keys from: widen --since, or model them with --vms "
                        "(and --skew)")
    shares: tuple[tuple[str, float], ...] = ()
    if request.vms is None:
        keys_total = sum(key_totals.values())
        shares = tuple((label, n / keys_total) for label, n in key_totals.items())
    inputs.workload = Workload(
        tasks_per_hour={a: n for a, n in per_hour.items() if n > 0},
        latency_s={a: latency[a] for a, n in per_hour.items() if n > 0},
        latency_cv=request.latency_cv, overhead_s=request.overhead_s,
        vms=request.vms or max(1, len(key_totals)), skew=request.skew if request.vms else "measured",
        key_shares=shares, latency_sd_s={a: latency_sd[a] for a, n in per_hour.items() if n > 0})
    return inputs


def _planned_rates(inputs: Inputs, request: Request, measured_share: dict[str, float]) -> dict[str, float]:
    """Tasks per hour of each action: measured or given, times the growth."""
    if request.tasks_per_hour:
        inputs.base_per_hour = sum(request.tasks_per_hour.values())
        inputs.rate_source = "given per action"
        return {a: n * request.growth for a, n in request.tasks_per_hour.items()}
    if request.total_per_hour is not None:
        inputs.base_per_hour, inputs.rate_source = request.total_per_hour, "given (--tasks-per-hour)"
    elif request.rate_basis == "mean" and inputs.mean_per_hour:
        inputs.base_per_hour, inputs.rate_source = inputs.mean_per_hour, "the window's mean"
    elif inputs.peak_per_hour:
        inputs.base_per_hour = inputs.peak_per_hour
        inputs.rate_source = f"the busiest, from {inputs.peak_bucket_start:%Y-%m-%d %H:%M:%S} UTC"
    else:
        raise PlanError("no tasks in the window to take the rate from: widen --since, or give --tasks-per-hour")
    mix = request.mix or measured_share
    weight = sum(mix.values())
    if weight <= 0:
        raise PlanError("the action mix is empty: give --mix ACTION=WEIGHT,...")
    return {a: inputs.base_per_hour * request.growth * w / weight for a, w in mix.items()}


@dataclass
class FleetPlan:
    """The model's answer plus what the operator reads beside it."""

    inputs: Inputs
    request: Request
    result: Plan
    at_shards: int | None  # the shard count the waits below are for (the answer, else the most searched)
    instances: int | None
    shards_per_instance: int | None  # the answer spread evenly over the instances
    action_waits: list[dict[str, Any]] = field(default_factory=list)
    hot_keys: list[dict[str, Any]] = field(default_factory=list)
    key_max_per_hour: float = 0.0


def make_plan(inputs: Inputs, request: Request) -> FleetPlan:
    result = plan(inputs.workload, request.target_p95_s, request.shards_per_instance, request.max_shards,
                  routing=request.routing)
    workload, service = inputs.workload, result.service
    finite = [r for r in result.rows if r.pool_p95_wait_s is not None]
    at = result.shards if result.shards is not None else (finite[-1].shards if finite else None)
    instances = result.instances
    each = math.ceil(result.shards / instances) if result.shards is not None and instances else None
    fleet = FleetPlan(inputs, request, result, at, instances, each,
                      key_max_per_hour=max_key_rate(service, request.target_p95_s) * 3600.0)
    rates = key_rates(workload)
    pool = mgc_wait(at, workload.rate_per_s, service) if at is not None else None
    by_shard = _HashedWaits(rates, service, at, result.partitions) if result.routing == "hash" else None
    measured = {str(a["action"]): a for a in inputs.actions}
    for action, per_hour in sorted(workload.tasks_per_hour.items(), key=lambda kv: -kv[1]):
        weights = inputs.action_key_weights.get(action) if workload.key_shares else None
        fleet.action_waits.append({
            "action": action, "tasks_per_hour": per_hour, "share": per_hour / (workload.rate_per_s * 3600.0),
            "run_mean_s": workload.latency_s[action],
            "run_sd_s": workload.latency_sd_s.get(action, workload.latency_cv * workload.latency_s[action]),
            "measured_wait_p95_s": (measured.get(action) or {}).get("wait_p95_s"),
            **(_waits(rates, service, pool, weights) if by_shard is None else by_shard.waits(weights or rates))})
    for key in sorted(rates, key=lambda k: -rates[k])[:HOT_KEYS_SHOWN]:
        own = mgc_wait(1, rates[key], service)
        if by_shard is not None:
            p95 = by_shard.waits({key: 1.0})["p95_wait_s"]  # its shard's queue: its own tasks are in it
        else:
            p95 = None if own is None or pool is None else sum_quantile(own, pool)
        fleet.hot_keys.append({
            "key": key_label(key), "tasks_per_hour": rates[key] * 3600.0,
            "utilisation": rates[key] * service.mean_s,
            "p95_wait_alone_s": None if own is None else own.quantile(), "p95_wait_s": p95})
    return fleet


class _HashedWaits:
    """Waits under hash routing at ``shards``: a task waits for the M/G/1 queue of its key's shard."""

    def __init__(self, rates: dict[Any, float], service: Any, shards: int | None, partitions: int) -> None:
        self.placed = hashing.PartitionRates(rates, partitions)
        self.shards = shards
        self.queues = (hashing.shard_waits(self.placed.shard_rates(shards), service) if shards is not None
                       else [])

    def waits(self, weights: dict[Any, float]) -> dict[str, float | None]:
        if self.shards is None:
            return {"mean_wait_s": None, "p95_wait_s": None}
        shares = hashing.key_shard_shares(self.placed, weights, self.shards)
        return {"mean_wait_s": hashing.mixed_mean(shares, self.queues),
                "p95_wait_s": hashing.mixed_p95(shares, self.queues)}


def _waits(rates: dict[Any, float], service: Any, pool: Wait | None,
           weights: dict[str, float] | None) -> dict[str, float | None]:
    """Mean and p95 wait of one action's tasks: the pool's plus each of their keys' own queue, mixed by key."""
    if pool is None:
        return {"mean_wait_s": None, "p95_wait_s": None}
    groups = key_groups(rates, service, weights)
    if not groups:
        groups = key_groups(rates, service)
    if any(own is None for _, own in groups):
        return {"mean_wait_s": None, "p95_wait_s": None}
    total = sum(share for share, _ in groups)
    mean = pool.mean_s + sum(share * own.mean_s for share, own in groups if own is not None) / total
    return {"mean_wait_s": mean, "p95_wait_s": mixture_p95(groups, pool)}


def row_json(row: Row) -> dict[str, Any]:
    return {"shards": row.shards, "instances": row.instances, "utilisation": row.utilisation,
            "wait_probability": row.wait_probability, "pool_mean_wait_s": row.pool_mean_wait_s,
            "pool_p95_wait_s": row.pool_p95_wait_s, "hottest_key_p95_wait_s": row.hottest_key_p95_wait_s,
            "all_tasks_p95_wait_s": row.overall_p95_wait_s, "meets_target": row.meets_target,
            "limited_by": row.limited_by}
