"""The capacity planner's model and search: how many shards (and instances) for a target p95 queueing delay.

Used by ``taskomatic plan`` (inputs from a fleet's history, ``taskomatic/capacity/fleet.py``) and by
``python -m bench.plan`` (inputs given on the command line).

``python -m bench.plan --tasks-per-hour start_vm=3000,migrate_vm=200 --latency start_vm=2.5,migrate_vm=30
--vms 5000 --skew zipf:1.1 --target-p95 5 --from-results bench/results/<dir>/results.json``

The model (printed with every answer):

* **The shards are a pool of c servers fed from one queue.** A shard runs
  one task at a time (``taskomatic/runtime/shard.py``), but it owns no keys:
  the fetcher sends a key with nothing in flight to whichever shard has room
  (``taskomatic/runtime/dispatch.py``). Tasks arrive as a Poisson stream of
  rate λ, so the pool is an **M/G/c** queue with offered load a = λ E[S]
  erlangs and utilisation rho = a / c (< 1 needed).
* **Pool wait: Erlang C with the Allen-Cunneen correction.** The probability
  that a task waits for a shard is Erlang C, C(c, a) (computed through the
  Erlang B recursion); the M/M/c mean wait C(c, a) E[S] / (c - a) is
  multiplied by (Ca² + Cs²) / 2 with Ca² = 1 (Poisson) and Cs² the service
  time's squared coefficient of variation: Wq = C(c, a) E[S] (1 + Cs²) /
  (2 (c - a)). For the **p95**: a task waits at all with probability
  C(c, a), and a waiting task's wait is exponential with mean Wq / C(c, a)
  (exact for M/M/c), so P(wait > t) = C exp(-C t / Wq) and
  p95 = (Wq / C) ln(C / 0.05), 0 when C <= 0.05. At c = 1 this is exactly
  the Pollaczek-Khinchine mean with the same exponential tail.
* **Each key is serial: its own M/G/1 queue.** Per-key order runs a key's
  tasks one after another, whatever the number of shards, so a key of rate
  λ_k is also an M/G/1 queue: rho_k = λ_k E[S] must be < 1, and its wait
  (Pollaczek-Khinchine, W_k = λ_k E[S²] / (2 (1 - rho_k)), with the same
  exponential tail) adds to the pool's: a task of key k waits
  W_k + W_pool, the two taken as independent, and the p95 of that sum is
  solved exactly for the two atom-plus-exponential distributions. (A
  conservative sum: a key's next task is pinned to the shard already running
  it and rarely waits for the pool as well.) No number of shards shortens
  W_k, so under skew the hottest key can need more than the shards the load
  alone needs, or be impossible: utilisation >= 1, or its own p95 over the
  target, and then the answer is the rate its tasks would have to slow to.
* **Keys** are VM ids 1..``--vms``; ``uniform``, or ``zipf:s`` (P(rank r) ∝
  1/r^s, ranks shuffled over the ids by ``--seed``, as the bench's workloads
  do). Every key has the same action mix (the mix is independent of the key).
* **Service time** of an action = its latency (mean ``--latency``, standard
  deviation ``--latency-cv`` x mean) + the per-task overhead of the pipeline,
  a constant: ``--overhead-ms``, or from a bench results.json: for each
  taskomatic run of a no-op workload, shards / throughput is the time a shard
  spends per task with no work; the planner takes the largest (the most
  contended run: conservative).
* **Answer**: the fewest shards c (searched from 1 up; both p95s fall as c
  grows) with rho < 1 whose pool p95 and hottest key's p95 both meet the
  target (the hottest key's is the largest of all keys'); ``pool_shards`` is
  the count the pool alone would need. The p95 over all tasks (a mix of the
  keys by rate; keys in buckets of 5 % rate, each at its bucket's highest
  rate; keys with rho_k < 0.001 counted as never waiting for themselves) is
  shown, not used. Instances (multihost) multiply shards: their shards are
  taken as one pool, since a free key goes to an instance with room (each
  claims free keys up to shards x keys_per_shard, and releases a key once
  drained or after its turn); instances = ceil(c / shards per instance).
  Not modelled: the fetcher's claim and dispatch limits (the overhead stands
  for them); a key held by one instance waits for that instance's shards
  only, which makes several instances a little less than one pool; CPU
  contention between shards beyond what the measured overhead holds; bursts
  (arrivals are Poisson); retries.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taskomatic.capacity import hashing
from taskomatic.capacity.queueing import NO_WAIT, Service, Wait, max_key_rate, mgc_wait, mixture_p95, sum_quantile
from taskomatic.partitions import DEFAULT_PARTITIONS

ROUTINGS = ("pinned", "hash")


class PlanError(ValueError):
    """The inputs do not describe a workload the planner can size."""



@dataclass(frozen=True)
class Workload:
    tasks_per_hour: dict[str, float]
    latency_s: dict[str, float]
    latency_cv: float
    overhead_s: float
    vms: int
    skew: str  # "uniform" or "zipf:<s>"
    seed: int = 1
    # Measured instead of modelled (``taskomatic plan`` from a fleet's history): each key's share of all
    # tasks, by its label ("Vm:12"), replacing vms/skew; and each action's latency standard deviation,
    # replacing latency_cv x mean for that action.
    key_shares: tuple[tuple[str, float], ...] = ()
    latency_sd_s: dict[str, float] = field(default_factory=dict)

    @property
    def rate_per_s(self) -> float:
        return sum(self.tasks_per_hour.values()) / 3600.0

    def service(self) -> Service:
        """Mix of actions: S = L_a + overhead with probability λ_a / λ; E[S], E[S²]."""
        total = sum(self.tasks_per_hour.values())
        mean = second = 0.0
        for action, per_hour in self.tasks_per_hour.items():
            share = per_hour / total
            latency = self.latency_s[action]
            sd = self.latency_sd_s.get(action, self.latency_cv * latency)
            mean += share * (latency + self.overhead_s)
            second += share * ((latency + self.overhead_s) ** 2 + sd ** 2)
        return Service(mean, second)


@dataclass(frozen=True)
class Row:
    shards: int
    instances: int
    utilisation: float  # rho = a / c, every shard's (the pool shares the load)
    wait_probability: float  # Erlang C: the chance a task waits for a shard (1 when rho >= 1)
    pool_mean_wait_s: float | None  # None: utilisation >= 1, the queue grows without bound
    pool_p95_wait_s: float | None
    hottest_key_p95_wait_s: float | None  # its own M/G/1 wait plus the pool's
    overall_p95_wait_s: float | None
    meets_target: bool
    limited_by: str | None  # why it misses: "capacity", "pool", "hottest key" (None when it meets)


@dataclass
class Plan:
    workload: Workload
    service: Service
    target_p95_s: float
    shards_per_instance: int
    max_shards: int
    hottest_key: str
    hottest_key_per_hour: float
    hottest_key_utilisation: float
    hottest_key_alone_p95_s: float | None  # its own queue only, as if a shard were always free
    hottest_key_max_per_hour: float  # the highest rate at which its own queue alone meets the target
    offered_load: float = 0.0  # a = λ E[S], in shards
    rows: list[Row] = field(default_factory=list)
    pool_shards: int | None = None  # the fewest shards the pool alone needs (the hottest key aside)
    shards: int | None = None
    instances: int | None = None
    verdict: str = ""
    routing: str = "pinned"  # the daemon's routing modelled: "pinned" (one pool) or "hash" (a queue per shard)
    partitions: int = DEFAULT_PARTITIONS

    def to_json(self) -> dict[str, Any]:
        return {"workload": asdict(self.workload), "service": {**asdict(self.service), "cv": self.service.cv},
                "model": model_name(self.routing), "routing": self.routing, "partitions": self.partitions,
                "target_p95_s": self.target_p95_s, "shards_per_instance": self.shards_per_instance,
                "max_shards": self.max_shards, "offered_load": self.offered_load,
                "hottest_key": self.hottest_key, "hottest_key_per_hour": self.hottest_key_per_hour,
                "hottest_key_utilisation": self.hottest_key_utilisation,
                "hottest_key_alone_p95_s": self.hottest_key_alone_p95_s,
                "hottest_key_max_per_hour": self.hottest_key_max_per_hour,
                "pool_shards": self.pool_shards, "shards": self.shards, "instances": self.instances,
                "verdict": self.verdict, "rows": [asdict(r) for r in self.rows]}


MODEL_NAME = ("M/G/c pool (Erlang C, Allen-Cunneen) + per-key M/G/1 (Pollaczek-Khinchine), "
              "exponential-tail p95")


def model_name(routing: str) -> str:
    """The model a routing is planned with (pinned: the pool; hash: ``taskomatic/capacity/hashing.py``)."""
    return hashing.HASH_MODEL_NAME if routing == "hash" else MODEL_NAME


# -- keys ------------------------------------------------------------------------------


def parse_skew(skew: str) -> float | None:
    """None for uniform, else the Zipf exponent s."""
    if skew == "uniform":
        return None
    if skew.startswith("zipf:"):
        try:
            s = float(skew.split(":", 1)[1])
        except ValueError:
            raise PlanError(f"bad skew {skew!r}: zipf:<exponent>, e.g. zipf:1.1") from None
        if s < 0:
            raise PlanError("the Zipf exponent must be >= 0")
        return s
    raise PlanError(f"bad skew {skew!r}: uniform or zipf:<exponent>")


def key_rates(workload: Workload) -> dict[Any, float]:
    """Tasks/s of every key: VM ids 1..vms by the skew, or the measured shares' labels."""
    total = workload.rate_per_s
    if workload.key_shares:
        return {label: total * share for label, share in workload.key_shares}
    s = parse_skew(workload.skew)
    ids = list(range(1, workload.vms + 1))
    if s is None:
        return {vm: total / workload.vms for vm in ids}
    weights = [1.0 / (rank ** s) for rank in range(1, workload.vms + 1)]
    norm = sum(weights)
    rng = random.Random(f"taskomatic-plan:{workload.seed}")
    rng.shuffle(ids)  # which VM is hottest depends on the seed, not always VM 1
    return {vm: total * w / norm for vm, w in zip(ids, weights, strict=True)}


def key_label(key: Any) -> str:
    """A VM id of the modelled keys as "Vm:<id>"; a measured key keeps its label."""
    return key if isinstance(key, str) else f"Vm:{key}"


KEY_BUCKET = 1.05  # keys whose rates are within 5 % share a bucket (at its highest rate) in the all-tasks p95
KEY_NEGLIGIBLE = 1e-3  # a key whose own utilisation is below this is taken as never waiting for itself


def key_groups(rates: dict[Any, float], service: Service,
               weights: dict[Any, float] | None = None) -> list[tuple[float, Wait | None]]:
    """The keys as (share of all tasks, own M/G/1 wait; None at utilisation >= 1), bucketed by rate.

    ``weights``: count the keys' tasks by these instead of their rates (one action's tasks on each key,
    for that action's waits); a key's own wait still comes from its total rate.
    """
    weights = rates if weights is None else weights
    total = sum(weights.get(key, 0.0) for key in rates)
    if total <= 0:
        return []
    buckets: dict[int | None, list[float]] = {}
    for key, rate in rates.items():
        weight = weights.get(key, 0.0)
        if rate <= 0 or weight <= 0:
            continue
        bucket = (None if rate * service.mean_s < KEY_NEGLIGIBLE
                  else math.floor(math.log(rate * service.mean_s) / math.log(KEY_BUCKET)))
        entry = buckets.setdefault(bucket, [0.0, 0.0])
        entry[0] += weight
        entry[1] = max(entry[1], rate)
    return [(summed / total, NO_WAIT if bucket is None else mgc_wait(1, highest, service))
            for bucket, (summed, highest) in buckets.items()]


# -- the search ------------------------------------------------------------------------


def evaluate(workload: Workload, shards: int, target_p95_s: float, shards_per_instance: int = 8,
             rates: dict[int, float] | None = None,
             groups: list[tuple[float, Wait | None]] | None = None) -> Row:
    """One shard count: the pool's wait, the hottest key's (its own plus the pool's), all tasks'."""
    service = workload.service()
    rates = rates if rates is not None else key_rates(workload)
    offered = workload.rate_per_s * service.mean_s
    pool = mgc_wait(shards, workload.rate_per_s, service)
    instances = math.ceil(shards / shards_per_instance)
    if pool is None:
        return Row(shards=shards, instances=instances, utilisation=offered / shards, wait_probability=1.0,
                   pool_mean_wait_s=None, pool_p95_wait_s=None, hottest_key_p95_wait_s=None,
                   overall_p95_wait_s=None, meets_target=False, limited_by="capacity")
    hot = mgc_wait(1, max(rates.values()), service)
    pool_p95 = pool.quantile()
    hot_p95 = None if hot is None else sum_quantile(hot, pool)
    if groups is None:
        groups = key_groups(rates, service)
    overall = mixture_p95(groups, pool)
    limited_by = ("pool" if pool_p95 > target_p95_s
                  else "hottest key" if hot_p95 is None or hot_p95 > target_p95_s else None)
    return Row(shards=shards, instances=instances, utilisation=offered / shards,
               wait_probability=pool.probability, pool_mean_wait_s=pool.mean_s, pool_p95_wait_s=pool_p95,
               hottest_key_p95_wait_s=hot_p95, overall_p95_wait_s=overall, meets_target=limited_by is None,
               limited_by=limited_by)


def evaluate_hash(workload: Workload, shards: int, target_p95_s: float, shards_per_instance: int,
                  rates: dict[Any, float], placed: hashing.PartitionRates) -> Row:
    """One shard count under hash routing: each shard its own M/G/1 queue; the busiest one's wait is the
    "pool" columns' (utilisation, P(wait) = its rho, mean and p95), the hottest key's is its shard's."""
    service = workload.service()
    per_shard = placed.shard_rates(shards)
    waits = hashing.shard_waits(per_shard, service)
    instances = math.ceil(shards / shards_per_instance)
    top = hashing.busiest(per_shard)
    worst = waits[top]
    rho = hashing.utilisation(per_shard, service)
    if worst is None or any(w is None for w in waits):
        return Row(shards=shards, instances=instances, utilisation=rho, wait_probability=1.0,
                   pool_mean_wait_s=None, pool_p95_wait_s=None, hottest_key_p95_wait_s=None,
                   overall_p95_wait_s=None, meets_target=False, limited_by="capacity")
    hottest = max(rates, key=lambda k: rates[k])
    hot_shard = placed.shard_of(hottest, shards)
    hot_wait = worst if hot_shard is None else waits[hot_shard]
    worst_p95 = worst.quantile()
    return Row(shards=shards, instances=instances, utilisation=rho, wait_probability=worst.probability,
               pool_mean_wait_s=worst.mean_s, pool_p95_wait_s=worst_p95,
               hottest_key_p95_wait_s=None if hot_wait is None else hot_wait.quantile(),
               overall_p95_wait_s=hashing.mixed_p95(per_shard, waits), meets_target=worst_p95 <= target_p95_s,
               limited_by=None if worst_p95 <= target_p95_s else "busiest shard")


def plan(workload: Workload, target_p95_s: float, shards_per_instance: int = 8, max_shards: int = 256,
         routing: str = "pinned", partitions: int = DEFAULT_PARTITIONS) -> Plan:
    """The fewest shards meeting the target (searching 1..max_shards), with the table that shows why.

    ``routing``: "pinned" (the shards a pool, plus each key's own queue) or "hash" (each shard its own
    queue of the partitions that hash to it: ``taskomatic/capacity/hashing.py``).
    """
    validate(workload)
    if target_p95_s < 0 or shards_per_instance < 1 or max_shards < 1:
        raise PlanError("the target must be >= 0, shards per instance and --max-shards >= 1")
    if routing not in ROUTINGS:
        raise PlanError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    if partitions < 1:
        raise PlanError("partitions must be >= 1")
    service = workload.service()
    rates = key_rates(workload)
    hottest = max(rates, key=lambda vm: rates[vm])
    hot_rate = rates[hottest]
    hot_alone = mgc_wait(1, hot_rate, service)
    result = Plan(workload=workload, service=service, target_p95_s=target_p95_s,
                  shards_per_instance=shards_per_instance, max_shards=max_shards, hottest_key=key_label(hottest),
                  hottest_key_per_hour=hot_rate * 3600.0, hottest_key_utilisation=hot_rate * service.mean_s,
                  hottest_key_alone_p95_s=None if hot_alone is None else hot_alone.quantile(),
                  hottest_key_max_per_hour=max_key_rate(service, target_p95_s) * 3600.0,
                  offered_load=workload.rate_per_s * service.mean_s, routing=routing, partitions=partitions)
    placed = hashing.PartitionRates(rates, partitions) if routing == "hash" else None
    slower = (f"its tasks would have to arrive at under {result.hottest_key_max_per_hour:,.0f}/h "
              f"(now {result.hottest_key_per_hour:,.0f}/h) to meet the target")
    if result.hottest_key_utilisation >= 1.0:
        result.verdict = (f"impossible: key {result.hottest_key} alone needs more than one shard (its tasks arrive at "
                          f"{hot_rate * 3600:,.0f}/h and take {service.mean_s:.3g} s each: utilisation "
                          f"{result.hottest_key_utilisation:.2f}); per-key order runs them one at a time, so no "
                          f"number of shards helps: {slower}")
    elif result.hottest_key_alone_p95_s is not None and result.hottest_key_alone_p95_s > target_p95_s:
        result.verdict = (f"impossible: key {result.hottest_key} waits behind its own tasks: p95 "
                          f"{result.hottest_key_alone_p95_s:.3g} s > target {target_p95_s:g} s even with a shard "
                          f"always free for it; per-key order runs them one at a time, so no number of shards "
                          f"helps: {slower}")
    # When no count can work, show a few for context instead of searching them all.
    counts = ([n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max_shards] if result.verdict
              else list(range(1, max_shards + 1)))
    groups = key_groups(rates, service)
    for shards in counts:
        row = (evaluate(workload, shards, target_p95_s, shards_per_instance, rates, groups) if placed is None
               else evaluate_hash(workload, shards, target_p95_s, shards_per_instance, rates, placed))
        result.rows.append(row)
        if result.pool_shards is None and row.pool_p95_wait_s is not None and row.pool_p95_wait_s <= target_p95_s:
            result.pool_shards = shards
        if row.meets_target and result.shards is None and not result.verdict:
            result.shards, result.instances = shards, row.instances
            break
    if result.shards is not None:
        result.verdict = (f"{result.shards} shard{'s' if result.shards != 1 else ''}, "
                          f"{result.instances} instance{'s' if result.instances != 1 else ''} "
                          f"of at most {shards_per_instance} shards")
        if routing == "hash":
            result.verdict += " with hash routing (each shard its own queue; the busiest shard sets it)"
        elif result.pool_shards is not None and result.pool_shards < result.shards:
            result.verdict += (f" (set by the hottest key {result.hottest_key}: the pool alone would need "
                               f"{result.pool_shards})")
    elif not result.verdict:
        result.verdict = f"not within {max_shards} shards (raise --max-shards)"
    return result


def validate(workload: Workload) -> None:
    if not workload.tasks_per_hour:
        raise PlanError("no actions in --tasks-per-hour")
    missing = set(workload.tasks_per_hour) - set(workload.latency_s)
    if missing:
        raise PlanError(f"no --latency for {', '.join(sorted(missing))}")
    if any(v < 0 for v in workload.tasks_per_hour.values()) or sum(workload.tasks_per_hour.values()) <= 0:
        raise PlanError("tasks per hour must be >= 0 and not all 0")
    if any(v < 0 for v in workload.latency_s.values()) or workload.latency_cv < 0 or workload.overhead_s < 0:
        raise PlanError("latencies, --latency-cv and the overhead must be >= 0")
    if workload.key_shares:
        if any(share < 0 for _, share in workload.key_shares) or sum(s for _, s in workload.key_shares) <= 0:
            raise PlanError("key shares must be >= 0 and not all 0")
    else:
        if workload.vms < 1:
            raise PlanError("--vms must be >= 1")
        parse_skew(workload.skew)
    if workload.service().mean_s <= 0:
        raise PlanError("every task takes 0 s: give a latency or an overhead")


# -- the measured overhead -----------------------------------------------------------


def overhead_from_results(path: Path) -> tuple[float, str]:
    """Per-task overhead (seconds) of one shard, from a bench results.json.

    What a shard spends per task besides the action itself. Measured on the
    burst runs with uniform keys and a fixed action time (sleep20-uniform):
    (shards x makespan - total work) / tasks, the largest over those runs. Such
    tasks start one at a time, as real VM actions do, so this is the overhead
    that matters for planning (no-op tasks start in batches and cost far less
    each). Without such a run: shards / throughput of the burst, uniform no-op
    runs, which understates it (batches). Runs limited by their arrival rate
    (steady) or by a hot key (Zipf) say nothing about a shard's overhead.
    Only pinned routing's runs count (a suite run with both routings has hash
    runs too): with hash routing the makespan also holds the shards' uneven
    load, which the hash model computes itself. ``path`` may be gzipped
    (``results.json.gz``, as bench/RESULTS/ keeps it).
    """
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    results = json.loads(text)
    workloads = {w["name"]: w for w in results.get("workloads", [])}

    def usable(run: dict[str, Any], latency: str) -> dict[str, Any] | None:
        w = workloads.get(run.get("workload", ""))
        ok = (run.get("runner") == "taskomatic" and run.get("complete") and w is not None
              and run.get("routing", "pinned") == "pinned"
              and w.get("latency") == latency and w.get("arrival") == "burst"
              and w.get("key_distribution") == "uniform")
        return w if ok else None

    timed = []
    for run in results.get("runs", []):
        w = usable(run, "fixed")
        if w is not None and run.get("makespan_s"):
            timed.append(((run["parallelism"] * run["makespan_s"] - w["total_work_s"]) / w["tasks"], run))
    if timed:
        overhead, run = max(timed, key=lambda c: c[0])
        listed = ", ".join(f"{r['workload']} {r['parallelism']} shard(s) -> {o * 1000:.2f} ms"
                           for o, r in sorted(timed, key=lambda c: c[0]))
        return overhead, (f"{path}: (shards x makespan - total work) / tasks, the largest over {len(timed)} "
                          f"fixed-latency burst runs ({listed}); used {run['workload']} at "
                          f"{run['parallelism']} shard(s)")
    noop = [(run["parallelism"] / run["throughput_tps"], run) for run in results.get("runs", [])
            if usable(run, "noop") is not None and run.get("throughput_tps")]
    if not noop:
        raise PlanError(f"{path}: no complete taskomatic burst run with uniform keys (fixed latency or no-op)")
    overhead, run = max(noop, key=lambda c: c[0])
    listed = ", ".join(f"{r['workload']} {r['parallelism']} shard(s) {r['throughput_tps']:.0f}/s "
                       f"-> {o * 1000:.2f} ms" for o, r in sorted(noop, key=lambda c: c[0]))
    return overhead, (f"{path}: shards/throughput, the largest over {len(noop)} no-op burst runs ({listed}); "
                      f"used {run['workload']} at {run['parallelism']} shard(s); no-op tasks start in batches, "
                      "so this understates the overhead of actions that start one at a time")


def parse_pairs(text: str, what: str) -> dict[str, float]:
    pairs: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise PlanError(f"{what}: expected NAME=NUMBER[,NAME=NUMBER...], got {item!r}")
        try:
            pairs[name.strip()] = float(value)
        except ValueError:
            raise PlanError(f"{what}: {value!r} is not a number") from None
    return pairs

