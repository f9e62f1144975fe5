"""The one-screen summary at the top of bench/RESULTS.md, generated from the JSON stored in bench/RESULTS/.

Every figure is read from a stored result (never typed by hand) with the date it was measured; a figure a
stored result does not hold is named as missing, not guessed. ``python -m bench.report_summary bench/RESULTS``
prints it; ``--write bench/RESULTS.md`` replaces the block between the two markers in that file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import load, machine_line

BEGIN = "<!-- summary:begin (generated: python -m bench.report_summary bench/RESULTS --write bench/RESULTS.md) -->"
END = "<!-- summary:end -->"
STANDALONE_WORKLOADS = ("noop-uniform", "noop-zipf", "sleep20-uniform", "sleep20-zipf", "heavy-uniform",
                        "heavy-zipf")
SHARD_COUNTS = (4, 16)


def _date(stamp: str | None) -> str:
    """'2026-11-25T18:45:51+00:00' -> '2026-11-25 18:45 UTC'."""
    return f"{stamp[:10]} {stamp[11:16]} UTC" if stamp else "date unknown"


def _tps(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "not measured"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def stored(results_dir: Path) -> dict[str, Any]:
    """The stored results the summary reads; a file that is absent is None (its figures are then missing)."""
    def optional(name: str) -> Any:
        path = results_dir / name
        return load(path) if path.exists() else None

    return {"suite": optional("results.json.gz") or optional("results.json"),
            "multihost": optional("multihost.json"), "multihost_scaling": optional("multihost_scaling.json"),
            "memory_idle": optional("shard_memory.json"), "memory_after": optional("shard_memory_after_work.json")}


def instance_memory_mb(samples: dict[str, Any] | None, shards: int = 4,
                       child_start: str = "forkserver") -> tuple[float, float] | None:
    """From a ``bench.shard_memory`` file: (PSS of a ``shards``-shard instance, USS each shard beyond the
    first costs: the instance's USS over a one-shard instance's, per added shard), MB; None if not sampled."""
    if not samples:
        return None
    found = {r["shards"]: r for r in samples.get("results", []) if r.get("child_start") == child_start}
    if shards not in found or 1 not in found:
        return None
    extra_uss = (found[shards]["total_uss_kb"] - found[1]["total_uss_kb"]) / (shards - 1)
    return found[shards]["total_pss_kb"] / 1024, extra_uss / 1024


def _cell(figures: dict[tuple[int, str], float | None], shards: int, used: list[str],
          show: Callable[[float | None], str]) -> str:
    """One table cell: the figure of each routing at that shard count, the default first."""
    return " / ".join(show(figures[(shards, routing)]) for routing in used)


def taskomatic_run(suite: dict[str, Any], workload: str, shards: int, routing: str = "pinned") -> dict[str, Any] | None:
    """The taskomatic run of this workload and shard count with this routing (a run from before the routing
    dimension has none: it counts as pinned, the default it ran with)."""
    return next((r for r in suite["runs"] if r["workload"] == workload and r["runner"] == "taskomatic"
                 and r["parallelism"] == shards and r.get("routing", "pinned") == routing
                 and not r.get("error")), None)


def routings(suite: dict[str, Any]) -> list[str]:
    """The routings the suite's taskomatic runs used, the default (pinned) first."""
    used = {r.get("routing", "pinned") for r in suite["runs"] if r["runner"] == "taskomatic"}
    return sorted(used, key=lambda routing: (routing != "pinned", routing))


def standalone_rows(suite: dict[str, Any]) -> list[dict[str, Any]]:
    """Per workload: tasks/s and makespan ratio at 4 and 16 shards per routing, and the best throughput of
    the default routing with its shards."""
    descriptions = {w["name"]: w["description"] for w in suite["workloads"]}
    rows = []
    for workload in STANDALONE_WORKLOADS:
        if workload not in descriptions:
            continue
        runs = [r for r in suite["runs"] if r["workload"] == workload and r["runner"] == "taskomatic"
                and r.get("routing", "pinned") == "pinned" and r.get("throughput_tps")]
        best = max(runs, key=lambda r: r["throughput_tps"]) if runs else None
        at = {(n, routing): taskomatic_run(suite, workload, n, routing)
              for n in SHARD_COUNTS for routing in routings(suite)}
        rows.append({
            "workload": workload, "description": descriptions[workload],
            "tps": {key: (r or {}).get("throughput_tps") for key, r in at.items()},
            "makespan_ratio": {key: (r or {}).get("makespan_ratio") for key, r in at.items()},
            "best_tps": best["throughput_tps"] if best else None,
            "best_shards": best["parallelism"] if best else None})
    return rows


def chain_line(suite: dict[str, Any], when: str) -> str | None:
    """The hottest key's chain in the no-op Zipf run at 4 shards: its share of the bound and its links
    against the probe's commits (None if the run did not record its links)."""
    run = taskomatic_run(suite, "noop-zipf", 4)
    links = (run or {}).get("chain_links") or {}
    shared, probe = links.get("shared") or {}, links.get("commits_shared") or {}
    alone = links.get("alone") or {}
    if run is None or not shared.get("count") or not probe.get("count") or not alone.get("count"):
        return None
    at_mean = links.get("share_at_mean_commits")
    return (f"* Hot key (noop-zipf, 4 shards): the run reached **{run['chain_bound']['share_of_bound']:.2f} of "
            f"its chain bound** (target 0.80; its tasks x the p50 of a probe's commits during the run)"
            + (f", {at_mean:.2f} of the chain's commits at their mean" if at_mean is not None else "")
            + f". While other keys ran, a link took {shared['p50_ms']:.2f} ms at the median ({shared['mean_ms']:.2f} "
            f"mean) and a bare commit {probe['p50_ms']:.2f} ms ({probe['mean_ms']:.2f}); alone, "
            f"{alone['p50_ms']:.2f} ms. Measured {when}.")


def makespan_line(suite: dict[str, Any], when: str) -> str | None:
    """Where the 20 ms uniform burst's makespan goes beyond its bound at 4 shards (None if not recorded)."""
    run = taskomatic_run(suite, "sleep20-uniform", 4)
    parts = (run or {}).get("makespan_parts")
    if run is None or not parts or not parts.get("over_bound_s"):
        return None
    over = parts["over_bound_s"]
    gap = parts["gap_ms"]
    return (f"* Makespan (sleep20-uniform, 4 shards): {run['makespan_s']:.2f} s against a bound of "
            f"{run['lower_bound_s']:.2f} s. Per shard, the {over:.2f} s over it are {parts['gaps_s']:.2f} s of gaps "
            f"between tasks (p50 {gap['p50']:.2f} ms each: the commit that ends one and starts the next, and the "
            f"messages around it), {parts['overrun_s']:.2f} s of actions running past 20 ms, "
            f"{parts['start_s']:.2f} s to the first start and {parts['end_idle_s']:.2f} s idle at the end. "
            f"Measured {when}.")


def shard_peak_rss_mb(suite: dict[str, Any]) -> float | None:
    """The largest peak RSS (VmHWM) of any shard in any taskomatic run of the suite, MB."""
    peaks = [p["peak_rss_kb"] for r in suite["runs"] if r["runner"] == "taskomatic" and r.get("rss")
             for p in r["rss"]["runner"] if p["role"].startswith("shard ")]
    return max(peaks) / 1024 if peaks else None


def summary(data: dict[str, Any]) -> str:
    suite, multihost = data["suite"], data["multihost"]
    if suite is None:
        raise ValueError("no results.json(.gz) in the results directory: nothing to summarise")
    when = _date(suite.get("started_at"))
    used = routings(suite)
    out = [BEGIN, "## At a glance: what one node can do", "",
           f"Machine: {machine_line(suite['machine'])}.", "",
           f"**Standalone** (one instance, per-key order), `bench.run --full` measured {when}. Tasks/s = "
           "tasks / (last end - first start); makespan / LB = makespan over its lower bound (1.00 is perfect; "
           "target 1.10)." + (f" Two figures in a cell: {' / '.join(used)} routing (`--routing`; pinned is the "
                              "default, and best (shards) is pinned's)." if len(used) > 1 else ""), "",
           "| workload | tasks/s at 4 shards | at 16 shards | best (shards) | makespan / LB at 4 | at 16 |",
           "|---|---|---|---|---|---|"]
    for row in standalone_rows(suite):
        tps, ratio = row["tps"], row["makespan_ratio"]
        out.append(f"| {row['workload']} ({row['description']}) | {_cell(tps, 4, used, _tps)} "
                   f"| {_cell(tps, 16, used, _tps)} | {_tps(row['best_tps'])} ({row['best_shards']}) "
                   f"| {_cell(ratio, 4, used, _ratio)} | {_cell(ratio, 16, used, _ratio)} |")
    idle = taskomatic_run(suite, "steady-idle", 4)
    loaded = taskomatic_run(suite, "steady-loaded", 4)
    out.append("")
    for name, run, target in (("idle (steady-idle, 25 tasks/s)", idle, " (target p50 <= 3, p99 <= 15)"),
                              ("loaded (steady-loaded, 500 tasks/s)", loaded, "")):
        if run and run.get("latency_ms"):
            lat = run["latency_ms"]
            split = run.get("latency_split_ms")
            where = (f"; at the median {split['to_claim_p50']:.1f} ms from the insert to the claim, "
                     f"{split['claim_to_start_p50']:.1f} ms from the claim to the start" if split else "")
            out.append(f"* Enqueue-to-start, {name}, 4 shards: **p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms**"
                       f"{target}{where}, measured {when}.")
        else:
            out.append(f"* Enqueue-to-start, {name}: not in the stored results.")
    out += [line for line in (chain_line(suite, when), makespan_line(suite, when)) if line]
    memory_idle = instance_memory_mb(data.get("memory_idle"))
    memory_after = instance_memory_mb(data.get("memory_after"))
    if memory_idle:
        memory = (f"* Memory (`bench.shard_memory`, shards forked from the preloaded fork server): a 4-shard "
                  f"instance **{memory_idle[0]:.1f} MB PSS** idle, each shard beyond the first "
                  f"**{memory_idle[1]:.1f} MB USS**")
        if memory_after:
            memory += f"; after 20,000 no-ops {memory_after[0]:.1f} MB and {memory_after[1]:.1f} MB"
        memory += " (targets 120 and 8 MB)"
    else:
        memory = "* Memory per instance: not in the stored results"
    rss = shard_peak_rss_mb(suite)
    if rss:
        memory += f". Peak RSS of one shard in the suite's runs: {rss:.1f} MB ({when})"
    out += [memory + ".", ""]
    if multihost and (multihost.get("scaling") or {}).get("summary"):
        scaling = multihost["scaling"]
        setups = ", ".join(f"{s['setup']} {_tps(s.get('throughput_tps'))}" for s in scaling["summary"])
        how = "partition leases" if any("routing" in x for x in scaling["summary"]) else "key claims"
        out += [f"**Multihost** ({how} between instances), `bench.multihost --quick` measured "
                f"{_date(multihost.get('started_at'))}: {scaling['workload']['description']}, "
                f"{scaling['shards_per_instance']} shards per instance, tasks/s ({_runs(scaling)}): {setups}"
                f"{_disturbed(scaling)}. "
                + ("Idle latency and memory per shard were not measured in multihost mode."
                   if multihost.get("workloads") else
                   "Zipf, 20 ms and heavy-tailed workloads, makespan ratios, idle latency and memory per shard "
                   "were not measured in multihost mode (not in the stored results)."), ""]
        out += multihost_workloads_table(multihost.get("workloads"))
    else:
        out += ["**Multihost**: not in the stored results.", ""]
    out += multihost_scaling_lines(data.get("multihost_scaling"))
    out += ["Plots: `bench/RESULTS/*.png`, one colour per system in every plot (bench/style.py). The detail "
            "follows.", END]
    return "\n".join(out)


def _runs(scaling: dict[str, Any]) -> str:
    repeats = scaling.get("repeats") or 1
    return "one run per setup" if repeats == 1 else f"the median of {repeats} runs per setup"


def multihost_scaling_lines(results: dict[str, Any] | None) -> list[str]:
    """The scaling runs of a many-run ``bench.multihost --only scaling`` file: each multihost setup's median
    tasks/s and PostgreSQL CPU per task over standalone's of the same routing (one run moves by +-30 %
    here, so this, not the one-run quick suite, is the figure to quote against issue 13's targets)."""
    scaling = (results or {}).get("scaling") or {}
    summary = [s for s in scaling.get("summary", []) if s.get("mode") == "multihost"]
    if not summary:
        return []
    cells = []
    for s in summary:
        spread = s.get("share_spread")
        shares = f", shares within {spread:.0%} of even" if spread is not None and s["instances"] > 1 else ""
        cells.append(f"{s['setup']} {_ratio(s.get('throughput_vs_standalone'))}x "
                     f"(PostgreSQL {_ratio(s.get('postgres_cpu_vs_standalone'))}x{shares})")
    suite = f"--{results['suite']} " if results and results.get("suite") else ""
    return [f"**Multihost scaling**, `bench.multihost {suite}--only scaling --scale-repeats {scaling['repeats']}` "
            f"measured {_date(results.get('started_at') if results else None)}: {scaling['workload']['description']}, "
            f"{scaling['shards_per_instance']} shards per instance, the median of {scaling['repeats']} runs per "
            f"setup; tasks/s against standalone with the same routing (target 0.8x), PostgreSQL CPU per task in "
            f"brackets (target 1.5x): {'; '.join(cells)}{_disturbed(scaling)}. Plot: "
            f"`bench/RESULTS/multihost_scaling.png`.", ""]


def multihost_workloads_table(workloads: dict[str, Any] | None) -> list[str]:
    """The other workloads in multihost mode: tasks/s (and makespan over its lower bound) per setup."""
    if not workloads or not workloads.get("summary"):
        return []
    rows = workloads["summary"]
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    out = ["| workload (multihost bench) | " + " | ".join(setups) + " |", "|---|" + "---|" * len(setups)]
    for w in workloads["workloads"]:
        cells = []
        for setup in setups:
            r = next((x for x in rows if x["workload"] == w["name"] and x["setup"] == setup), None)
            if r is None or r.get("throughput_tps") is None:
                cells.append("-")
                continue
            ratio = f" ({r['makespan_ratio']:.2f})" if r.get("makespan_ratio") is not None else ""
            cells.append(f"{_tps(r['throughput_tps'])}{ratio}")
        out.append(f"| {w['description']} | " + " | ".join(cells) + " |")
    other = max((r.get("other_share_max") or 0.0) for r in rows)
    out += ["", "Tasks/s per setup (makespan / LB in brackets, the bound of the setup's own shards); "
                f"other processes took up to {other:.0%} of the machine.", ""]
    return out


def _disturbed(scaling: dict[str, Any]) -> str:
    """A warning when other processes took a large share of the machine during those runs."""
    other = max((x.get("other_share_max") or 0.0) for x in scaling["summary"])
    return (f" (other processes took up to {other:.0%} of the machine during these runs: the tasks/s are "
            "disturbed, compare the CPU per task)") if other >= 0.2 else ""


def replace_block(text: str, block: str) -> str:
    """``text`` with the summary block replaced, or inserted after the first heading when absent."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    lines = text.split("\n")
    first_heading = next((i for i, line in enumerate(lines) if line.startswith("# ")), -1)
    return "\n".join([*lines[:first_heading + 1], "", block, "", *lines[first_heading + 1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report_summary", description=__doc__.split("\n")[0])
    parser.add_argument("results_dir", type=Path, help="the folder of stored results (bench/RESULTS)")
    parser.add_argument("--write", type=Path, metavar="MARKDOWN", help="replace the summary block in this file")
    args = parser.parse_args(argv)
    try:
        block = summary(stored(args.results_dir))
    except (ValueError, KeyError, json.JSONDecodeError) as error:
        print(f"cannot summarise {args.results_dir}: {error!r}", file=sys.stderr)
        return 2
    if args.write:
        args.write.write_text(replace_block(args.write.read_text(), block))
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
