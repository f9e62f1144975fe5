"""Capacity planner: how many shards (and instances) for a target p95 queueing delay.

``python -m bench.plan --tasks-per-hour start_vm=3000,migrate_vm=200 --latency start_vm=2.5,migrate_vm=30
--vms 5000 --skew zipf:1.1 --target-p95 5 --from-results bench/results/<dir>/results.json``

The model (printed with every answer):

* **Shards are M/G/1 servers.** A shard runs one task at a time, in order
  (``taskomatic/runtime/shard.py``); tasks arrive as a Poisson stream.
* **Keys are not split.** Every task of one VM goes to the shard
  ``taskomatic.runtime.router.shard_for(Vm:id, shards)`` picks, so a shard's
  arrival rate is the sum of the rates of the keys hashed to it, computed key
  by key with the real router: the busiest shard carries the hottest key's
  whole load plus whatever else hashes there. A key whose own utilisation is
  >= 1 cannot be served by any number of shards.
* **Keys** are VM ids 1..``--vms``; ``uniform``, or ``zipf:s`` (P(rank r) ∝
  1/r^s, ranks shuffled over the ids by ``--seed``, as the bench's workloads
  do). Every key has the same action mix (the mix is independent of the key).
* **Service time** of an action = its latency (mean ``--latency``, standard
  deviation ``--latency-cv`` x mean) + the per-task overhead of the pipeline,
  a constant: ``--overhead-ms``, or from a bench results.json: for each
  taskomatic run of a no-op workload, shards / throughput is the time a shard
  spends per task with no work; the planner takes the largest (the most
  contended run: conservative).
* **Waiting** (enqueue to start; the queueing delay): Pollaczek-Khinchine
  mean, W = λ E[S²] / (2 (1 - rho)). **p95**: the exponential-tail
  approximation: a task waits at all with probability rho, and a waiting task's
  wait is exponential with mean W / rho, so P(wait > t) = rho exp(-rho t / W) and
  p95 = (W / rho) ln(rho / 0.05) (0 when rho <= 0.05). Exact for M/M/1; for other
  service distributions it matches the mean and the heavy-traffic tail.
* **Answer**: the fewest shards whose every shard has rho < 1 and whose busiest
  shard's p95 meets the target; instances = ceil(shards / shards per
  instance). Not modelled: the fetcher's claim and dispatch limits (the
  overhead stands for them), CPU contention between shards beyond what the
  measured overhead holds, bursts (arrivals are Poisson), retries.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taskomatic.runtime.router import OrderingKey, shard_for

P95 = 0.95


class PlanError(ValueError):
    """The inputs do not describe a workload the planner can size."""


@dataclass(frozen=True)
class Service:
    """The service time of one task drawn from the action mix: its mean and second moment (seconds)."""

    mean_s: float
    second_moment_s2: float

    @property
    def cv(self) -> float:
        variance = max(0.0, self.second_moment_s2 - self.mean_s ** 2)
        return math.sqrt(variance) / self.mean_s if self.mean_s > 0 else 0.0


@dataclass(frozen=True)
class Workload:
    tasks_per_hour: dict[str, float]
    latency_s: dict[str, float]
    latency_cv: float
    overhead_s: float
    vms: int
    skew: str  # "uniform" or "zipf:<s>"
    seed: int = 1

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
            mean += share * (latency + self.overhead_s)
            second += share * ((latency + self.overhead_s) ** 2 + (self.latency_cv * latency) ** 2)
        return Service(mean, second)


@dataclass(frozen=True)
class Row:
    shards: int
    instances: int
    max_utilisation: float
    mean_utilisation: float
    busiest_shard: int
    busiest_mean_wait_s: float | None  # None: utilisation >= 1, the queue grows without bound
    busiest_p95_wait_s: float | None
    overall_p95_wait_s: float | None
    meets_target: bool


@dataclass
class Plan:
    workload: Workload
    service: Service
    target_p95_s: float
    shards_per_instance: int
    max_shards: int
    hottest_key: str
    hottest_key_utilisation: float
    hottest_key_alone_p95_s: float | None
    rows: list[Row] = field(default_factory=list)
    shards: int | None = None
    instances: int | None = None
    verdict: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"workload": asdict(self.workload), "service": {**asdict(self.service), "cv": self.service.cv},
                "target_p95_s": self.target_p95_s, "shards_per_instance": self.shards_per_instance,
                "max_shards": self.max_shards, "hottest_key": self.hottest_key,
                "hottest_key_utilisation": self.hottest_key_utilisation,
                "hottest_key_alone_p95_s": self.hottest_key_alone_p95_s,
                "shards": self.shards, "instances": self.instances, "verdict": self.verdict,
                "rows": [asdict(r) for r in self.rows]}


# -- queueing ----------------------------------------------------------------------------


def mg1_mean_wait(rate: float, service: Service) -> float | None:
    """Pollaczek-Khinchine: mean wait in queue of an M/G/1 server; None when utilisation >= 1."""
    rho = rate * service.mean_s
    if rho >= 1.0:
        return None
    return rate * service.second_moment_s2 / (2.0 * (1.0 - rho))


def wait_tail(rate: float, service: Service, t: float) -> float:
    """P(wait > t) under the exponential-tail approximation: rho exp(-rho t / W)."""
    rho = rate * service.mean_s
    wait = mg1_mean_wait(rate, service)
    if wait is None:
        return 1.0
    if rho <= 0.0 or wait <= 0.0:
        return 0.0
    return rho * math.exp(-rho * t / wait)


def p95_wait(rate: float, service: Service, q: float = P95) -> float | None:
    """The q-quantile of the wait: (W/rho) ln(rho/(1-q)), 0 when rho <= 1-q; None when rho >= 1."""
    rho = rate * service.mean_s
    wait = mg1_mean_wait(rate, service)
    if wait is None:
        return None
    if rho <= 1.0 - q or wait <= 0.0:
        return 0.0
    return wait / rho * math.log(rho / (1.0 - q))


def mixture_p95(rates: list[float], service: Service, q: float = P95) -> float | None:
    """The q-quantile of the wait of a random task over all shards (each shard weighted by its rate)."""
    total = sum(rates)
    if total <= 0:
        return 0.0
    if any(r * service.mean_s >= 1.0 for r in rates):
        return None

    def tail(t: float) -> float:
        return sum(r * wait_tail(r, service, t) for r in rates if r > 0) / total

    if tail(0.0) <= 1.0 - q:
        return 0.0
    high = 1.0
    while tail(high) > 1.0 - q:
        high *= 2.0
    low = 0.0
    for _ in range(100):
        mid = (low + high) / 2.0
        if tail(mid) > 1.0 - q:
            low = mid
        else:
            high = mid
    return high


# -- keys and shards -----------------------------------------------------------------


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


def key_rates(workload: Workload) -> dict[int, float]:
    """Tasks/s of every VM id 1..vms."""
    s = parse_skew(workload.skew)
    total = workload.rate_per_s
    ids = list(range(1, workload.vms + 1))
    if s is None:
        return {vm: total / workload.vms for vm in ids}
    weights = [1.0 / (rank ** s) for rank in range(1, workload.vms + 1)]
    norm = sum(weights)
    rng = random.Random(f"taskomatic-plan:{workload.seed}")
    rng.shuffle(ids)  # which VM is hottest depends on the seed, not always VM 1
    return {vm: total * w / norm for vm, w in zip(ids, weights, strict=True)}


def shard_rates(rates: dict[int, float], shards: int) -> list[float]:
    """Arrival rate of each shard: every key's rate to the shard the real router gives it."""
    loads = [0.0] * shards
    for vm, rate in rates.items():
        loads[shard_for(OrderingKey("Vm", vm), shards)] += rate
    return loads


def evaluate(workload: Workload, shards: int, target_p95_s: float, shards_per_instance: int = 8,
             rates: dict[int, float] | None = None) -> Row:
    service = workload.service()
    loads = shard_rates(rates if rates is not None else key_rates(workload), shards)
    busiest = max(range(shards), key=lambda i: loads[i])
    utilisations = [r * service.mean_s for r in loads]
    p95 = p95_wait(loads[busiest], service)
    return Row(shards=shards, instances=math.ceil(shards / shards_per_instance),
               max_utilisation=max(utilisations), mean_utilisation=sum(utilisations) / shards,
               busiest_shard=busiest, busiest_mean_wait_s=mg1_mean_wait(loads[busiest], service),
               busiest_p95_wait_s=p95, overall_p95_wait_s=mixture_p95(loads, service),
               meets_target=p95 is not None and p95 <= target_p95_s)


def plan(workload: Workload, target_p95_s: float, shards_per_instance: int = 8, max_shards: int = 256) -> Plan:
    """The fewest shards meeting the target (searching 1..max_shards), with the table that shows why."""
    validate(workload)
    if target_p95_s < 0 or shards_per_instance < 1 or max_shards < 1:
        raise PlanError("the target must be >= 0, shards per instance and --max-shards >= 1")
    service = workload.service()
    rates = key_rates(workload)
    hottest = max(rates, key=lambda vm: rates[vm])
    hot_rate = rates[hottest]
    result = Plan(workload=workload, service=service, target_p95_s=target_p95_s,
                  shards_per_instance=shards_per_instance, max_shards=max_shards, hottest_key=f"Vm:{hottest}",
                  hottest_key_utilisation=hot_rate * service.mean_s,
                  hottest_key_alone_p95_s=p95_wait(hot_rate, service))
    if result.hottest_key_utilisation >= 1.0:
        result.verdict = (f"impossible: key Vm:{hottest} alone needs more than one shard (its tasks arrive at "
                          f"{hot_rate * 3600:.0f}/h and take {service.mean_s:.3g} s each: utilisation "
                          f"{result.hottest_key_utilisation:.2f}); per-key order forbids splitting it")
    elif result.hottest_key_alone_p95_s is not None and result.hottest_key_alone_p95_s > target_p95_s:
        result.verdict = (f"impossible: key Vm:{hottest} alone, on a shard of its own, waits p95 "
                          f"{result.hottest_key_alone_p95_s:.3g} s > target {target_p95_s:g} s; no number of "
                          f"shards helps (per-key order: its tasks queue behind each other)")
    # When no count can work, show a few for context instead of searching them all.
    counts = ([n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max_shards] if result.verdict
              else list(range(1, max_shards + 1)))
    for shards in counts:
        row = evaluate(workload, shards, target_p95_s, shards_per_instance, rates)
        result.rows.append(row)
        if row.meets_target and result.shards is None and not result.verdict:
            result.shards, result.instances = shards, row.instances
            break
    if result.shards is not None:
        result.verdict = (f"{result.shards} shard{'s' if result.shards != 1 else ''}, "
                          f"{result.instances} instance{'s' if result.instances != 1 else ''} "
                          f"at {shards_per_instance} shards each")
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
    if workload.vms < 1:
        raise PlanError("--vms must be >= 1")
    parse_skew(workload.skew)
    if workload.service().mean_s <= 0:
        raise PlanError("every task takes 0 s: give a latency or an overhead")


# -- the measured overhead -----------------------------------------------------------


def overhead_from_results(path: Path) -> tuple[float, str]:
    """Per-task overhead (seconds) of one shard: the largest shards / throughput of the no-op taskomatic runs."""
    results = json.loads(path.read_text())
    noop = {w["name"] for w in results.get("workloads", []) if w.get("latency") == "noop"}
    candidates = []
    for run in results.get("runs", []):
        if run.get("runner") == "taskomatic" and run.get("workload") in noop and run.get("complete") \
                and run.get("throughput_tps"):
            candidates.append((run["parallelism"] / run["throughput_tps"], run))
    if not candidates:
        raise PlanError(f"{path}: no complete taskomatic run of a no-op workload")
    overhead, run = max(candidates, key=lambda c: c[0])
    listed = ", ".join(f"{r['workload']} {r['parallelism']} shard(s) {r['throughput_tps']:.0f}/s "
                       f"-> {o * 1000:.2f} ms" for o, r in sorted(candidates, key=lambda c: c[0]))
    return overhead, (f"{path}: the largest of shards/throughput over {len(candidates)} no-op taskomatic runs "
                      f"({listed}); used {run['workload']} at {run['parallelism']} shard(s)")


# -- output ------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    if value is None:
        return "inf (rho >= 1)"
    return f"{value:.3f}" if value < 10 else f"{value:,.1f}"


def render(result: Plan, overhead_source: str) -> str:
    w, svc = result.workload, result.service
    lines = ["Workload:"]
    for action, per_hour in sorted(w.tasks_per_hour.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {action:<16} {per_hour:>10,.0f} tasks/h  latency {w.latency_s[action]:g} s "
                     f"(sd {w.latency_cv * w.latency_s[action]:g} s)")
    lines += [
        f"  total {w.rate_per_s * 3600:,.0f} tasks/h = {w.rate_per_s:.4g} tasks/s over {w.vms:,} VMs, "
        f"keys {w.skew} (seed {w.seed})",
        f"  per-task overhead {w.overhead_s * 1000:.3f} ms ({overhead_source})",
        f"  service time: mean {svc.mean_s:.4g} s, E[S²] {svc.second_moment_s2:.4g} s², cv {svc.cv:.3f}; "
        f"offered load {w.rate_per_s * svc.mean_s:.3f} shard-equivalents",
        f"  hottest key {result.hottest_key}: utilisation {result.hottest_key_utilisation:.3f} on its own, "
        f"p95 wait alone {_s(result.hottest_key_alone_p95_s)} s",
        "",
        "Model: each shard an M/G/1 server (one task at a time, Poisson arrivals); keys are never split, a key's",
        "whole rate goes to the shard taskomatic.runtime.router.shard_for picks; mean wait by Pollaczek-Khinchine",
        "W = λE[S²]/(2(1-rho)); p95 by the exponential-tail approximation P(wait > t) = rho·exp(-rhot/W),",
        "i.e. p95 = (W/rho)·ln(rho/0.05) (exact for M/M/1). Service = latency + constant overhead; the action mix",
        "is the same for every key. Not modelled: fetcher limits beyond the measured overhead, bursts, retries.",
        "",
        f"Target: p95 queueing delay (enqueue to start) <= {result.target_p95_s:g} s on the busiest shard.",
        "",
        "| shards | instances | max rho | mean rho | busiest shard mean wait s | busiest p95 s | all tasks p95 s "
        "| meets |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    shown = _rows_to_show(result)
    for row in result.rows:
        if row.shards in shown or result.verdict.startswith("impossible"):
            lines.append(f"| {row.shards} | {row.instances} | {row.max_utilisation:.3f} | "
                         f"{row.mean_utilisation:.3f} | {_s(row.busiest_mean_wait_s)} | "
                         f"{_s(row.busiest_p95_wait_s)} | {_s(row.overall_p95_wait_s)} | "
                         f"{'yes' if row.meets_target else 'no'} |")
    lines += ["", f"Answer: {result.verdict}"]
    return "\n".join(lines)


def _rows_to_show(result: Plan) -> set[int]:
    n = result.rows[-1].shards if result.rows else 0
    shown = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256} & set(range(1, n + 1))
    shown |= set(range(max(1, n - 3), n + 1))
    return shown


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks-per-hour", required=True, metavar="ACTION=N,...", help="expected tasks per hour")
    parser.add_argument("--latency", required=True, metavar="ACTION=S,...", help="mean action latency, seconds")
    parser.add_argument("--latency-cv", type=float, default=1.0,
                        help="latency standard deviation / mean, every action (default 1.0: exponential-like)")
    parser.add_argument("--vms", type=int, required=True, help="number of VMs (ordering keys)")
    parser.add_argument("--skew", default="uniform", help="uniform or zipf:<s> (default uniform)")
    parser.add_argument("--target-p95", type=float, required=True, help="target p95 queueing delay, seconds")
    parser.add_argument("--shards-per-instance", type=int, default=8, help="shards one instance runs (default 8)")
    parser.add_argument("--max-shards", type=int, default=256, help="search up to this many shards (default 256)")
    parser.add_argument("--seed", type=int, default=1, help="which VMs are hot under zipf (default 1)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--overhead-ms", type=float, help="per-task overhead of a shard, milliseconds")
    source.add_argument("--from-results", type=Path, help="a bench results.json: the overhead of its no-op runs")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead")
    args = parser.parse_args(argv)
    try:
        if args.from_results is not None:
            overhead_s, overhead_source = overhead_from_results(args.from_results)
        else:
            overhead_s, overhead_source = args.overhead_ms / 1000.0, "--overhead-ms"
        workload = Workload(tasks_per_hour=parse_pairs(args.tasks_per_hour, "--tasks-per-hour"),
                            latency_s=parse_pairs(args.latency, "--latency"), latency_cv=args.latency_cv,
                            overhead_s=overhead_s, vms=args.vms, skew=args.skew, seed=args.seed)
        result = plan(workload, args.target_p95, args.shards_per_instance, args.max_shards)
    except (PlanError, OSError, json.JSONDecodeError) as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps({**result.to_json(), "overhead_source": overhead_source}, indent=1))
    else:
        print(render(result, overhead_source))
    return 0 if result.shards is not None else 2


if __name__ == "__main__":
    sys.exit(main())
