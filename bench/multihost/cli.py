"""``python -m bench.multihost``: the options, the whole run (the four measurements on one private PostgreSQL),
and the JSON, summary and plot it writes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import MULTIHOST, Harness, Interrupted, check_overrides
from bench.multihost.join import run_join
from bench.multihost.mixes import mix_summary, mix_workloads, run_mix
from bench.multihost.output import (
    join_line,
    mix_line,
    plot_scaling,
    render_summary,
    results_path,
    scaling_line,
    takeover_line,
)
from bench.multihost.scaling import run_scaling, scaling_summary, setup_label
from bench.multihost.suite import CORES_NOTE, POLL, SHARDS, Ctx, Plan, plan_for, resolved_settings, summarise
from bench.multihost.takeover import run_takeover
from bench.workloads import Workload, generate

SCHEMA_VERSION = 1
DESCRIPTION = ("Multihost mode under load: ``python -m bench.multihost`` (``--quick``, the default; ``--full``; "
               "``--smoke``).")


def run_all(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    from tqdm import tqdm

    overrides = [*plan.settings, *(args.set or [])]
    started_at = datetime.now(UTC)
    wall_start = time.monotonic()
    takeover_runs: list[dict[str, Any]] = []
    scaling_runs: list[dict[str, Any]] = []
    do_takeover = args.only in (None, "takeover")
    do_scaling = args.only in (None, "scaling")
    do_join = args.only in (None, "join")
    do_mixes = args.only in (None, "workloads")
    mix_runs: list[dict[str, Any]] = []
    mixes = mix_workloads(plan)
    join_runs: list[dict[str, Any]] = []
    takeover_workload = Workload("takeover", plan.takeover_initial + 400 * plan.takeover_chunk, plan.takeover_keys,
                                 latency="fixed", base_ms=plan.takeover_sleep_ms)
    scale_workload = Workload("scaling-noop", plan.scale_tasks, plan.scale_keys)
    scale_setups = [(count, multihost, routing) for count, multihost in
                    [(1, False), *((n, True) for n in plan.scale_instances)] for routing in plan.routings]
    with Harness("taskomatic-bench-mh-", args.keep_work_dir, announce="bench work directory") as harness:
        machine = harness.machine
        total = (plan.takeover_repeats if do_takeover else 0) + \
            (plan.scale_repeats * len(scale_setups) if do_scaling else 0) + (plan.join_repeats if do_join else 0) + \
            (plan.mix_repeats * len(mixes) * len(scale_setups) if do_mixes else 0)
        with tqdm(total=total, unit="run", dynamic_ncols=True, disable=args.no_progress, file=sys.stderr) as bar:
            ctx = Ctx(harness, overrides, bar)
            if do_takeover:
                tasks = generate(takeover_workload, args.seed)
                for rep in range(plan.takeover_repeats):
                    bar.set_description(f"takeover {rep + 1}/{plan.takeover_repeats}")
                    result = run_takeover(ctx, plan, rep, tasks, args.seed)
                    takeover_runs.append(result)
                    bar.write(takeover_line(result))
                    bar.update(1)
            if do_join:
                tasks = generate(takeover_workload, args.seed)
                for rep in range(plan.join_repeats):
                    bar.set_description(f"join {rep + 1}/{plan.join_repeats}")
                    result = run_join(ctx, plan, rep, tasks)
                    join_runs.append(result)
                    bar.write(join_line(result))
                    bar.update(1)
            if do_scaling:
                tasks = generate(scale_workload, args.seed)
                for rep in range(plan.scale_repeats):
                    for count, multihost, routing in scale_setups:
                        bar.set_description(f"scaling {setup_label(count, multihost, routing)}")
                        result = run_scaling(ctx, plan, count, multihost, routing, rep, tasks)
                        scaling_runs.append(result)
                        bar.write(scaling_line(result))
                        bar.update(1)
            if do_mixes:
                for rep in range(plan.mix_repeats):
                    for workload in mixes:
                        for count, multihost, routing in scale_setups:
                            bar.set_description(f"{workload.name} {setup_label(count, multihost, routing)}")
                            result = run_mix(ctx, plan, workload, count, multihost, routing, args.seed, rep)
                            mix_runs.append(result)
                            bar.write(mix_line(result))
                            bar.update(1)
    resolved = resolved_settings(overrides)
    multihost_settings = {k: resolved[k] for k in ("lease_seconds", "lease_renew_interval") if k in resolved}
    takeover: dict[str, Any] | None = None
    if do_takeover:
        takeover = {
            "workload": {**takeover_workload.to_json(), "tasks": None,
                         "description": f"sleep {plan.takeover_sleep_ms:g} ms tasks over {plan.takeover_keys} "
                                        f"keys (uniform): a burst of {plan.takeover_initial}, topped up by "
                                        f"{plan.takeover_chunk} whenever fewer than {plan.takeover_low_water} "
                                        "unclaimed tasks wait, until every partition of the killed instance moved"},
            "instances": plan.takeover_instances, "shards_per_instance": SHARDS, "repeats": plan.takeover_repeats,
            "hold_s": plan.hold_s, "runs": takeover_runs,
            "summary": {name: summarise([r[name] for r in takeover_runs if r.get(name) is not None])
                        for name in ("first_partition_s", "first_task_s", "all_partitions_s",
                                     "victim_lease_left_at_kill_s",
                                     "in_flight_settled_s")},
            "ok": bool(takeover_runs) and all(r["ok"] for r in takeover_runs),
        }
    join: dict[str, Any] | None = None
    if do_join:
        join = {"workload": {**takeover_workload.to_json(), "tasks": None,
                             "description": f"sleep {plan.takeover_sleep_ms:g} ms tasks over {plan.takeover_keys} "
                                            "keys (uniform), topped up so the instances stay busy"},
                "shards_per_instance": SHARDS, "repeats": plan.join_repeats, "hold_s": plan.hold_s, "runs": join_runs,
                "summary": {name: summarise([r[name] for r in join_runs if r.get(name) is not None])
                            for name in ("first_partition_s", "first_task_s", "even_share_s",
                                         "all_back_after_leave_s")},
                "ok": bool(join_runs) and all(r["ok"] for r in join_runs)}
    scaling: dict[str, Any] | None = None
    if do_scaling:
        scaling = {"workload": scale_workload.to_json(), "shards_per_instance": SHARDS,
                   "routings": list(plan.routings),
                   "repeats": plan.scale_repeats, "note": CORES_NOTE.format(cores=machine.get("cores")),
                   "runs": scaling_runs, "summary": scaling_summary(scaling_runs),
                   "ok": bool(scaling_runs) and all(r["ok"] for r in scaling_runs)}
    workloads: dict[str, Any] | None = None
    if do_mixes:
        workloads = {"workloads": [w.to_json() for w in mixes], "shards_per_instance": SHARDS,
                     "routings": list(plan.routings), "repeats": plan.mix_repeats,
                     "note": CORES_NOTE.format(cores=machine.get("cores")),
                     "runs": mix_runs, "summary": mix_summary(mix_runs),
                     "ok": bool(mix_runs) and all(r["ok"] for r in mix_runs)}
    return {
        "kind": "multihost",
        "schema": SCHEMA_VERSION,
        "suite": plan.name,
        "seed": args.seed,
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - wall_start, 1),
        "machine": machine,
        "settings": {"overrides": overrides, "multihost": multihost_settings,
                     "defaults": not overrides, "daemon_config": resolved, "command": " ".join(sys.argv),
                     "poll_s": POLL},
        "takeover": takeover,
        "scaling": scaling,
        "join": join,
        "workloads": workloads,
        "ok": all(part["ok"] for part in (takeover, scaling, join, workloads) if part is not None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multihost", description=DESCRIPTION)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="suite", action="store_const", const="quick",
                       help="3 takeovers; 5,000 no-op tasks over 500 keys per scaling run (default)")
    which.add_argument("--full", dest="suite", action="store_const", const="full",
                       help="10 takeovers; 20,000 no-op tasks over 500 keys, 3 runs per scaling setup")
    which.add_argument("--smoke", dest="suite", action="store_const", const="smoke",
                       help="a tiny run for CI (a 3 s lease, so its takeover figures are not the defaults')")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument("--out", type=Path, help="the JSON file (or a directory for multihost-<stamp>.json); "
                                                 "default bench/results/multihost-<stamp>.json")
    parser.add_argument("--only", choices=["takeover", "scaling", "join", "workloads"],
                        help="run one of the four measurements")
    parser.add_argument("--instances", type=int, choices=[2, 3], help="instances in the takeover runs (default 2)")
    parser.add_argument("--repeats", type=int, help="takeover repetitions (default: quick 3, full 10)")
    parser.add_argument("--scale-repeats", type=int,
                        help="runs per scaling setup (default: quick 1, full 3); one run moves by +-30 %% on a "
                             "2-core machine, so a verdict near a target needs about 10")
    parser.add_argument("--routing", choices=["pinned", "hash", "both"], default="both",
                        help="the routing inside each instance in the scaling runs: pinned, hash or both side by "
                             "side (default both)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="a daemon setting for every instance (as taskomatic --set); the figures are then "
                             "not those of the defaults, and the output says so")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the /tmp work directory (daemon logs)")
    parser.set_defaults(suite="quick")
    args = parser.parse_args(argv)
    plan = plan_for(args.suite)
    if args.instances:
        plan = plan.with_instances(args.instances)
    if args.routing != "both":
        plan = Plan(**{**asdict(plan), "routings": (args.routing,)})
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        plan = Plan(**{**asdict(plan), "takeover_repeats": args.repeats})
    if args.scale_repeats is not None:
        if args.scale_repeats < 1:
            parser.error("--scale-repeats must be at least 1")
        plan = Plan(**{**asdict(plan), "scale_repeats": args.scale_repeats})
    check_overrides(parser, args.set, [MULTIHOST, *plan.settings])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        results = run_all(args, plan)
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted; everything the bench started is stopped", file=sys.stderr)
        return 130
    path = results_path(args.out, stamp)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(render_summary(results))
    print(f"\nwrote {path}")
    plot = plot_scaling(results, path.with_suffix(".png"))
    if plot is not None:
        print(f"wrote {plot}")
    if not results["ok"]:
        print("checks failed (see the JSON: runs[].checks, runs[].error)", file=sys.stderr)
        return 1
    return 0
