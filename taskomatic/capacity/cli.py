"""``taskomatic plan`` and ``taskomatic bench``: capacity planning where the operators are.

``plan`` reads the fleet's own tasks table (read-only, one snapshot; see
``taskomatic/db/history.py``) and answers with the model of
``taskomatic.capacity.model``. ``bench`` runs the benchmark suite
(``bench.run``), which the RPM ships in the ``taskomatic-bench`` subpackage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from taskomatic.capacity.fleet import DEFAULT_OVERHEAD_MS, Request, inputs_from_history, make_plan
from taskomatic.capacity.model import PlanError, overhead_from_results, parse_pairs
from taskomatic.cli_queue import UsageError
from taskomatic.config import Config

BENCH_MISSING = ("taskomatic bench: the benchmark suite is not installed. Install the taskomatic-bench package "
                 "(dnf install taskomatic-bench: the bench modules and python3-matplotlib for the plots), or "
                 "from source: pip install 'taskomatic[bench]'")
_UNITS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """``7d``, ``12h``, ``30min``, ``90s`` or plain seconds, as seconds (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text)
    if not match or match.group(2) not in ("", *_UNITS):
        raise argparse.ArgumentTypeError(f"expected a duration such as 7d, 12h, 30min or 90s, got {text!r}")
    seconds = float(match.group(1)) * _UNITS.get(match.group(2), 1)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return seconds


def add_parsers(sub: Any, common: Any) -> None:
    plan = sub.add_parser(
        "plan", help="how many shards and instances for a wait target, from this fleet's own history",
        description="Reads the tasks table (read-only) over a window: actions, run times, arrivals per hour, "
                    "tasks per ordering key; then answers, for that load (or --growth times it, or another "
                    "--tasks-per-hour or --mix), how many shards in how many instances keep the p95 wait from "
                    "submission to start under --target-p95, with the expected wait of every action and the "
                    "hot keys' limits. The model: README, Capacity planning. Exit 0 with an answer, 1 when no "
                    "shard count meets the target.")
    common(plan)
    plan.add_argument("--target-p95", type=float, default=60.0, metavar="S",
                      help="target p95 wait from submission to start, seconds (default 60)")
    plan.add_argument("--since", type=duration, default=7 * 86400.0, metavar="DURATION",
                      help="history window back from now: 7d (default), 24h, 90min...")
    plan.add_argument("--bucket", type=duration, default=3600.0, metavar="DURATION",
                      help="arrivals are counted per bucket of this length (default 1h); the busiest sets the rate")
    plan.add_argument("--rate", choices=["peak", "mean"], default="peak",
                      help="plan for the busiest bucket's arrival rate (default) or the window's mean")
    plan.add_argument("--growth", type=float, default=1.0, metavar="F",
                      help="multiply the arrival rate (every action, every key) by F, e.g. 1.5")
    plan.add_argument("--tasks-per-hour", metavar="N|ACTION=N,...",
                      help="plan for this rate instead of the measured one: a total (the measured mix), or "
                           "per action (the mix too)")
    plan.add_argument("--mix", metavar="ACTION=WEIGHT,...", help="another action mix (weights), same total rate")
    plan.add_argument("--latency", metavar="ACTION=S,...",
                      help="an action's mean run time, seconds, instead of the measured one (needed for an "
                           "action the window never ran)")
    plan.add_argument("--latency-cv", type=float, default=1.0,
                      help="sd / mean of the run times given with --latency (default 1.0)")
    plan.add_argument("--vms", type=int, metavar="N",
                      help="model the keys as N VMs (with --skew) instead of the measured keys")
    plan.add_argument("--skew", default="uniform", help="with --vms: uniform or zipf:<s> (default uniform)")
    overhead = plan.add_mutually_exclusive_group()
    overhead.add_argument("--from-results", type=Path, metavar="RESULTS_JSON",
                          help="the per-task overhead measured by taskomatic bench (its results.json)")
    overhead.add_argument("--overhead-ms", type=float,
                          help=f"per-task overhead of a shard, ms (default {DEFAULT_OVERHEAD_MS:g}: bench/RESULTS.md)")
    plan.add_argument("--shards-per-instance", type=int, default=8, metavar="N",
                      help="the most shards one instance runs (default 8)")
    plan.add_argument("--max-shards", type=int, default=256, metavar="N", help="search up to N shards (default 256)")
    # Its own dest: the daemon's global --routing (taskomatic --routing ... run) is refused on plan.
    plan.add_argument("--routing", dest="plan_routing", choices=["pinned", "hash"],
                      help="the daemon's routing to plan for (default: the routing setting of the "
                           "configuration, pinned unless set): pinned (the shards are one pool, each key its "
                           "own queue) or hash (each shard its own queue, fed by the keys whose partition "
                           "maps to it)")
    plan.add_argument("--no-history", action="store_true",
                      help="read no database: every input from the options (--tasks-per-hour per action, "
                           "--latency, --vms)")
    plan.add_argument("--json", action="store_true", help="one JSON document (see README, JSON output)")

    bench = sub.add_parser(
        "bench", help="run the benchmark suite (the taskomatic-bench package)",
        description="The benchmark suite (bench/README.md): a private PostgreSQL by default; with --dsn, a "
                    "database of its own created on that server (a unique name, dropped at the end: nothing "
                    "else there is touched). Writes results.json, report.md and the plots (with matplotlib) "
                    "to --out. Exit 1 when a run did not complete or broke per-key order.")
    common(bench)
    which = bench.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="suite", action="store_const", const="quick",
                       help="the quick suite (default; about 5 minutes on 2 cores)")
    which.add_argument("--full", dest="suite", action="store_const", const="full", help="the full suite")
    which.add_argument("--smoke", dest="suite", action="store_const", const="smoke", help="a tiny run (CI)")
    bench.add_argument("--only", action="append", metavar="WORKLOAD", help="run only this workload (repeatable)")
    bench.add_argument("--out", type=Path, metavar="DIR",
                       help="report directory (default ./taskomatic-bench-<stamp>-<suite>)")
    bench.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    bench.add_argument("--no-plots", action="store_true", help="JSON and Markdown only")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--routing", dest="bench_routing", choices=["pinned", "hash", "both"],
                       help="the daemon routing(s) the throughput and makespan workloads run with, side by side "
                            "(default: both in --quick and --full, pinned in --smoke)")
    bench.add_argument("--keep-work-dir", action="store_true", help="keep the /tmp work directory (runner logs)")
    bench.set_defaults(suite="quick")


def _request(args: argparse.Namespace, routing: str = "pinned") -> Request:
    if args.from_results is not None:
        overhead_s, detail = overhead_from_results(args.from_results)
        source = f"measured by taskomatic bench: {args.from_results}"
        if "understates" in detail:  # only no-op runs in it (the smoke suite): batches start cheaper
            source += "; no-op runs only, which understates it"
    elif args.overhead_ms is not None:
        overhead_s, source = args.overhead_ms / 1000.0, "--overhead-ms"
    else:
        overhead_s, source = DEFAULT_OVERHEAD_MS / 1000.0, "default: bench/RESULTS.md; --from-results for yours"
    total, per_action = None, {}
    if args.tasks_per_hour:
        try:
            total = float(args.tasks_per_hour)
        except ValueError:
            per_action = parse_pairs(args.tasks_per_hour, "--tasks-per-hour")
    if args.target_p95 < 0 or args.shards_per_instance < 1 or args.max_shards < 1 or args.latency_cv < 0:
        raise PlanError("--target-p95 and --latency-cv must be >= 0, --shards-per-instance and --max-shards >= 1")
    if args.vms is not None and args.vms < 1:
        raise PlanError("--vms must be >= 1")
    return Request(target_p95_s=args.target_p95, overhead_s=overhead_s, overhead_source=source,
                   growth=args.growth, rate_basis=args.rate, total_per_hour=total, tasks_per_hour=per_action,
                   mix=parse_pairs(args.mix, "--mix") if args.mix else {},
                   latency_s=parse_pairs(args.latency, "--latency") if args.latency else {},
                   latency_cv=args.latency_cv, vms=args.vms, skew=args.skew,
                   shards_per_instance=args.shards_per_instance, max_shards=args.max_shards,
                   routing=getattr(args, "plan_routing", None) or routing)


def cmd_plan(config: Config, args: argparse.Namespace) -> int:
    from taskomatic.capacity import screen
    from taskomatic.cli_common import print_json, session

    try:
        request = _request(args, config.routing)
        history = None
        until = dt.datetime.now(dt.UTC)
        since = None
        if not args.no_history:
            from taskomatic.db.history import read_history

            since = until - dt.timedelta(seconds=args.since)
            with session(config, "plan", read_only=True) as store:
                history = read_history(store, since, until, args.bucket)
        elif not (args.tasks_per_hour and args.vms):
            raise PlanError("--no-history needs --tasks-per-hour ACTION=N,..., --latency and --vms")
        fleet = make_plan(inputs_from_history(history, request), request)
    except (PlanError, OSError, json.JSONDecodeError) as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print_json(screen.document(fleet, since, until))
    else:
        print(screen.render(fleet, since, until))
    return 0 if fleet.result.shards is not None else 1


def cmd_bench(config: Config, args: argparse.Namespace) -> int:
    try:
        from bench import run as bench_run
    except ImportError:
        print(BENCH_MISSING, file=sys.stderr)
        return 1
    if config.log_level != "debug":  # the progress bar and the report are the output, not server chatter
        logging.getLogger("taskomatic").setLevel(logging.WARNING)
    dsn = getattr(args, "dsn", None)
    if dsn == "embedded":
        raise UsageError("taskomatic bench runs its own private PostgreSQL by default: leave out --dsn embedded")
    argv = [f"--{args.suite}", "--seed", str(args.seed)]
    for name in args.only or []:
        argv += ["--only", name]
    out = args.out or Path.cwd() / f"taskomatic-bench-{dt.datetime.now():%Y%m%d-%H%M%S}-{args.suite}"
    argv += ["--out", str(out)]
    argv += ["--no-plots"] * args.no_plots + ["--no-progress"] * args.no_progress
    argv += ["--keep-work-dir"] * args.keep_work_dir
    if getattr(args, "bench_routing", None):
        argv += ["--routing", args.bench_routing]
    for setting in getattr(args, "settings", None) or []:
        argv += ["--set", setting]
    if dsn:
        argv += ["--dsn", dsn]
    return bench_run.main(argv, prog="taskomatic bench")
