"""The planner's model against measured runs: ``python -m bench.validate_plan``.

For a few small workloads, Poisson arrivals of the bench's ``sleep`` action
(exponential durations, so cv 1 as the model assumes by default) over uniform
or Zipf keys go through the real daemon (``bench.harness``: a private
PostgreSQL, a fresh database per run, the daemon with N shards); the waits
(``time_started - created_at``) measured in the tasks table are set beside the
model's prediction for the same workload (``taskomatic.capacity.model``: the
M/G/c pool plus each key's M/G/1 queue; for the hash-routing case, each shard
its own M/G/1 queue of the keys hashed to it). The keys are drawn from the model's
own key rates, so both describe the same workload. The service time the model
is given is the mean sleep plus the per-task overhead (``--overhead-ms``,
default the planner's default); the measured mean service time
(``time_ended - time_started``; the overhead outside it is not in the
table) is reported beside it. Each run is short (this machine is shared).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench.harness import RESULTS_DIR, CpuWindow, Harness, Interrupted, fetch_rows, insert_tasks, unfinished
from bench.runners import RunnerSpec
from bench.workloads import PlannedTask
from taskomatic.capacity import hashing
from taskomatic.capacity.fleet import DEFAULT_OVERHEAD_MS
from taskomatic.capacity.model import Workload, evaluate, evaluate_hash, key_groups, key_rates
from taskomatic.capacity.queueing import mgc_wait

TICK = 0.005  # seconds between insert checks


@dataclass(frozen=True)
class Case:
    name: str
    shards: int
    rate_per_s: float
    mean_ms: float
    keys: int
    skew: str  # uniform or zipf:<s>
    seconds: float  # how long tasks arrive
    routing: str = "pinned"  # the daemon's --routing, and the model's (hash: each shard its own M/G/1 queue)

    @property
    def tasks(self) -> int:
        return round(self.rate_per_s * self.seconds)


CASES = (
    Case("200 uniform keys, 2 shards, 25/s", 2, 25.0, 60.0, 200, "uniform", 30.0),
    Case("200 uniform keys, 4 shards, 50/s", 4, 50.0, 60.0, 200, "uniform", 30.0),
    Case("40 Zipf(1.1) keys, 4 shards, 30/s", 4, 30.0, 60.0, 40, "zipf:1.1", 30.0),
    # Lower than case 2's rate: with hash routing the busiest shard, not the average, must stay below 1.
    Case("200 uniform keys, 4 shards, 40/s, hash routing", 4, 40.0, 60.0, 200, "uniform", 30.0, "hash"),
)


def model_workload(case: Case, overhead_s: float, seed: int) -> Workload:
    return Workload(tasks_per_hour={"sleep": case.rate_per_s * 3600.0}, latency_s={"sleep": case.mean_ms / 1000.0},
                    latency_cv=1.0, overhead_s=overhead_s, vms=case.keys, skew=case.skew, seed=seed)


def schedule(case: Case, workload: Workload, seed: int) -> list[tuple[float, PlannedTask]]:
    """Poisson arrivals (exponential gaps), keys drawn by the model's rates, exponential sleeps."""
    rng = random.Random(f"validate-plan:{case.name}:{seed}")
    rates = key_rates(workload)
    keys, weights = list(rates), list(rates.values())
    at, planned = 0.0, []
    for _ in range(case.tasks):
        at += rng.expovariate(case.rate_per_s)
        key = rng.choices(keys, weights)[0]
        sleep_ms = rng.expovariate(1.0 / case.mean_ms)  # exponential, mean mean_ms
        planned.append((at, PlannedTask(int(key), "sleep", round(sleep_ms, 3))))
    return planned


def predict(case: Case, workload: Workload) -> dict[str, Any]:
    service = workload.service()
    rates = key_rates(workload)
    if case.routing == "hash":
        return _predict_hash(case, workload, rates)
    row = evaluate(workload, case.shards, target_p95_s=1e9)
    pool = mgc_wait(case.shards, workload.rate_per_s, service)
    groups = key_groups(rates, service)
    total = sum(share for share, _ in groups)
    mean = None if pool is None or any(own is None for _, own in groups) else (
        pool.mean_s + sum(share * own.mean_s for share, own in groups if own is not None) / total)
    return {"utilisation": row.utilisation, "pool_mean_s": row.pool_mean_wait_s, "pool_p95_s": row.pool_p95_wait_s,
            "mean_s": mean, "p95_s": row.overall_p95_wait_s, "hottest_key_p95_s": row.hottest_key_p95_wait_s,
            "service_mean_s": service.mean_s}


def _predict_hash(case: Case, workload: Workload, rates: dict[Any, float]) -> dict[str, Any]:
    """Hash routing: each shard an M/G/1 queue of the keys hashed to it (``taskomatic/capacity/hashing.py``)."""
    service = workload.service()
    placed = hashing.PartitionRates(rates)
    row = evaluate_hash(workload, case.shards, 1e9, case.shards, rates, placed)
    per_shard = placed.shard_rates(case.shards)
    waits = hashing.shard_waits(per_shard, service)
    return {"utilisation": row.utilisation, "pool_mean_s": row.pool_mean_wait_s, "pool_p95_s": row.pool_p95_wait_s,
            "mean_s": hashing.mixed_mean(per_shard, waits), "p95_s": row.overall_p95_wait_s,
            "hottest_key_p95_s": row.hottest_key_p95_wait_s, "service_mean_s": service.mean_s,
            "shard_utilisation": [rate * service.mean_s for rate in per_shard]}


def refit_prediction(case: Case, measured: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """The same model given the service time this run really had (its mean sleep and its per-task overhead):
    what is left of the error is the model's own."""
    if measured.get("overhead_s") is None:
        return None
    refit = Case(case.name, case.shards, case.rate_per_s, measured["run_mean_s"] * 1000.0, case.keys, case.skew,
                 case.seconds, case.routing)
    return predict(refit, model_workload(refit, measured["overhead_s"], seed))


def measure_waits(conn: Any) -> dict[str, Any]:
    rows = fetch_rows(conn, "SELECT task_target_id AS key, extract(epoch FROM time_started - created_at)::float8 AS "
                            "wait, extract(epoch FROM time_ended - time_started)::float8 AS run FROM tasks "
                            "WHERE state = 'finished' ORDER BY id")
    conn.commit()
    waits = sorted(r["wait"] for r in rows)
    per_key: dict[int, list[float]] = {}
    for r in rows:
        per_key.setdefault(r["key"], []).append(r["wait"])
    hottest = max(per_key.values(), key=len)
    # A shard's time between two tasks when the next one was already waiting: the per-task overhead as it
    # really was (dispatch, the start and end transactions, CPU contention), outside time_started..time_ended.
    gap = fetch_rows(conn, "SELECT avg(gap)::float8 AS gap, count(*) AS n FROM (SELECT extract(epoch FROM "
                           "time_started - lag(time_ended) OVER w) AS gap, created_at < lag(time_ended) OVER w "
                           "AS waiting FROM tasks WHERE state = 'finished' WINDOW w AS (PARTITION BY run_by_shard "
                           "ORDER BY time_started)) g WHERE waiting")[0]
    conn.commit()
    return {"tasks": len(rows), "overhead_s": gap["gap"], "overhead_samples": gap["n"],
            "mean_s": sum(waits) / len(waits), "p95_s": _p95(waits),
            "hottest_key_p95_s": _p95(sorted(hottest)), "hottest_key_tasks": len(hottest),
            "run_mean_s": sum(r["run"] for r in rows) / len(rows)}


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]


def run_case(harness: Harness, case: Case, overhead_s: float, seed: int, index: int) -> dict[str, Any]:
    workload = model_workload(case, overhead_s, seed)
    planned = schedule(case, workload, seed)
    result: dict[str, Any] = {"case": case.__dict__, "tasks": case.tasks, "predicted": predict(case, workload)}
    with harness.fresh_database() as dsn:
        spec = RunnerSpec("taskomatic", case.shards, "hash" if case.routing == "hash" else None)
        runner = harness.start(spec, dsn, harness.base / f"run{index}", [])
        conn = psycopg2.connect(dsn, application_name="bench")
        try:
            runner.wait_ready()
            window = CpuWindow([runner.pid], harness.local_postmaster_pid)
            start, inserted = time.monotonic(), 0
            deadline = start + case.seconds * 3 + 60
            while time.monotonic() < deadline:
                now = time.monotonic() - start
                due = inserted
                while due < len(planned) and planned[due][0] <= now:
                    due += 1
                if due > inserted:
                    insert_tasks(conn, [t for _, t in planned[inserted:due]])
                    inserted = due
                if inserted == len(planned) and unfinished(conn) == 0:
                    break
                time.sleep(TICK)
            cpu = window.close()
            result["other_load_share"] = cpu.other_share
        finally:
            harness.stop(runner)
        result["measured"] = measure_waits(conn)
        conn.close()
    refit = refit_prediction(case, result["measured"], seed)
    if refit is not None:
        result["predicted_measured_service"] = refit
    p, m = result["predicted"], result["measured"]
    result["error"] = {k: (None if p[k] is None else m[k] - p[k]) for k in ("mean_s", "p95_s", "hottest_key_p95_s")}
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| workload | tasks | overhead ms | rho | mean wait ms | p95 wait ms | hottest key p95 ms | run mean ms "
             "| other load |",
             "|---|---:|---:|---:|---|---|---|---:|---:|"]

    def ms(value: float | None) -> str:
        return "inf" if value is None else f"{value * 1000:.0f}"

    for r in results:
        m = r["measured"]
        for label, p, run_ms in (("predicted", r["predicted"], r["case"]["mean_ms"]),
                                 ("predicted, measured service", r.get("predicted_measured_service"),
                                  m["run_mean_s"] * 1000.0)):
            if p is None:
                continue
            overhead = p["service_mean_s"] * 1000 - run_ms
            lines.append(f"| {r['case']['name']}: {label} | | {overhead:.1f} | {p['utilisation']:.2f} | "
                         f"{ms(p['mean_s'])} | {ms(p['p95_s'])} | {ms(p['hottest_key_p95_s'])} | {run_ms:.1f} | |")
        lines.append(f"| {r['case']['name']}: **measured** | {m['tasks']} | "
                     f"{(m['overhead_s'] or 0) * 1000:.1f} | | {ms(m['mean_s'])} | {ms(m['p95_s'])} | "
                     f"{ms(m['hottest_key_p95_s'])} | {m['run_mean_s'] * 1000:.1f} | "
                     f"{(r.get('other_load_share') or 0):.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.validate_plan", description=__doc__.split("\n")[0])
    parser.add_argument("--overhead-ms", type=float, default=DEFAULT_OVERHEAD_MS,
                        help=f"per-task overhead the model is given (default {DEFAULT_OVERHEAD_MS:g})")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", type=int, action="append", metavar="N", help="run only case N (1-based)")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/validate-plan-<stamp>.json)")
    args = parser.parse_args(argv)
    cases = [c for i, c in enumerate(CASES, 1) if not args.only or i in args.only]
    results = []
    started = datetime.now(UTC)
    try:
        with Harness("taskomatic-validate-plan-", announce="work directory") as harness:
            for index, case in enumerate(cases, 1):
                print(f"{case.name}: {case.tasks} tasks over {case.seconds:.0f} s ...", flush=True)
                results.append(run_case(harness, case, args.overhead_ms / 1000.0, args.seed, index))
            machine = harness.machine
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted; everything started is stopped", file=sys.stderr)
        return 130
    out = args.out or RESULTS_DIR / f"validate-plan-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"started_at": started.isoformat(timespec="seconds"), "machine": machine,
                               "command": " ".join(sys.argv), "overhead_ms": args.overhead_ms,
                               "results": results}, indent=1) + "\n")
    print(table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
