"""Capacity planner from given inputs: ``python -m bench.plan``.

``python -m bench.plan --tasks-per-hour start_vm=3000,migrate_vm=200 --latency start_vm=2.5,migrate_vm=30
--vms 5000 --skew zipf:1.1 --target-p95 5 --from-results bench/results/<dir>/results.json``

The model and the search are ``taskomatic.capacity.model`` (its docstring and bench/README.md,
"Capacity planner", say how it works); ``taskomatic plan`` plans from a fleet's own tasks table
with the same model. This module is the command line with every input given by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from taskomatic.capacity.explain import render
from taskomatic.capacity.model import (
    MODEL_NAME,
    Plan,
    PlanError,
    Row,
    Workload,
    evaluate,
    key_groups,
    key_rates,
    overhead_from_results,
    parse_pairs,
    parse_skew,
    plan,
    validate,
)

__all__ = ["MODEL_NAME", "Plan", "PlanError", "Row", "Workload", "evaluate", "key_groups", "key_rates", "main",
           "overhead_from_results", "parse_pairs", "parse_skew", "plan", "render", "validate"]


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
    parser.add_argument("--routing", choices=["pinned", "hash"], default="pinned",
                        help="the daemon's routing: pinned (default; the shards a pool) or hash (each shard its own "
                             "queue of the keys hashed to it)")
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
        result = plan(workload, args.target_p95, args.shards_per_instance, args.max_shards, routing=args.routing)
    except (PlanError, OSError, json.JSONDecodeError) as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps({**result.to_json(), "overhead_source": overhead_source}, indent=1))
    else:
        print(render(result, overhead_source))
    return 0 if result.shards is not None else 2


if __name__ == "__main__":
    sys.exit(main())

