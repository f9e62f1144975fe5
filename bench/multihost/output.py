"""The multihost benchmark's output: the summary printed as tables, the scaling plot, where the JSON goes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import style
from bench.harness import RESULTS_DIR
from bench.multihost.suite import SHARDS


def results_path(out: Path | None, stamp: str) -> Path:
    """``--out``: a .json file, or a directory to put multihost-<stamp>.json in; default bench/results/."""
    if out is None:
        return RESULTS_DIR / f"multihost-{stamp}.json"
    if out.suffix == ".json":
        return out
    return out / f"multihost-{stamp}.json"


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def takeover_line(r: dict[str, Any]) -> str:
    if r.get("first_partition_s") is None and r.get("error"):
        return f"  takeover {r['repetition']}: FAILED: {r['error'].splitlines()[0]}"
    verdict = "checks ok" if r["ok"] else f"CHECKS FAILED {[k for k, v in r.get('checks', {}).items() if not v]}"
    error = f" ({r['error'].splitlines()[0]})" if r.get("error") else ""
    return (f"  takeover {r['repetition']}: {r.get('partitions_at_kill')} partitions; first partition "
            f"{_s(r.get('first_partition_s'))} s, first task {_s(r.get('first_task_s'))} s, all partitions "
            f"{_s(r.get('all_partitions_s'))} s after the kill "
            f"(its lease had {_s(r.get('victim_lease_left_at_kill_s'))} s left); {verdict}{error}")


def join_line(r: dict[str, Any]) -> str:
    if r.get("first_task_s") is None and r.get("error"):
        return f"  join {r['repetition']}: FAILED: {r['error'].splitlines()[0]}"
    verdict = "checks ok" if r["ok"] else f"CHECKS FAILED {[k for k, v in r.get('checks', {}).items() if not v]}"
    return (f"  join {r['repetition']}: first partition {_s(r.get('first_partition_s'))} s, first task "
            f"{_s(r.get('first_task_s'))} s, even share {_s(r.get('even_share_s'))} s after it registered; "
            f"after its graceful leave all back in {_s(r.get('all_back_after_leave_s'))} s; {verdict}")


def scaling_line(r: dict[str, Any]) -> str:
    if r.get("throughput_tps") is None:
        return f"  scaling {r['setup']}: FAILED: {(r.get('error') or '?').splitlines()[0]}"
    verdict = "checks ok" if r["ok"] else f"CHECKS FAILED {[k for k, v in r.get('checks', {}).items() if not v]}"
    return (f"  scaling {r['setup']}: {r['throughput_tps']:.0f} tasks/s, shares "
            f"{'/'.join(f'{s:.0%}' for s in r['share_per_instance'])}; {verdict}")


def mix_line(r: dict[str, Any]) -> str:
    if r.get("throughput_tps") is None:
        return f"  {r['workload']} {r['setup']}: FAILED: {(r.get('error') or '?').splitlines()[0]}"
    verdict = "checks ok" if r["ok"] else f"CHECKS FAILED {[k for k, v in r.get('checks', {}).items() if not v]}"
    ratio = f", makespan {_s(r.get('makespan_ratio'))}x its lower bound" if r.get("makespan_ratio") else ""
    return f"  {r['workload']} {r['setup']}: {r['throughput_tps']:.0f} tasks/s{ratio}; {verdict}"


def render_workloads(workloads: dict[str, Any]) -> list[str]:
    out = ["", f"4. Workloads over instances ({workloads['shards_per_instance']} shards per instance, "
               f"{workloads['repeats']} run(s) per setup, median): the scaling setups on Zipf keys, 20 ms tasks "
               "and a heavy tail", f"   NOTE: {workloads['note']}."]
    described = {w["name"]: w["description"] for w in workloads["workloads"]}
    for name in described:
        rows = [s for s in workloads["summary"] if s["workload"] == name]
        if not rows:
            continue
        out += ["", f"{name}: {described[name]}", "",
                "| setup | tasks/s | vs SA | makespan s | vs lower bound | tkm CPU s/1k | PG CPU s/1k | PG vs SA "
                "| hot-key link gap ms | links claimed late | commit ms | chain bound tasks/s | share of bound "
                "| share per instance | other load | checks |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
        for s in rows:
            share = " / ".join(f"{v:.0%}" for v in s["share_per_instance"] or [])
            late = s.get("hot_chain_claimed_late_share")
            out.append(f"| {s['setup']} | {_s(s['throughput_tps'], 0)} | {_s(s['throughput_vs_standalone'])} "
                       f"| {_s(s.get('makespan_s'))} | {_s(s.get('makespan_ratio'))} "
                       f"| {_s(s['taskomatic_cpu_s_per_1k'], 3)} | {_s(s['postgres_cpu_s_per_1k'], 3)} "
                       f"| {_s(s.get('postgres_cpu_vs_standalone'))} | {_s(s.get('hot_chain_gap_p50_ms'))} "
                       f"| {'-' if late is None else f'{late:.0%}'} | {_s(s.get('commit_p50_ms'))} "
                       f"| {_s(s.get('chain_bound_tps'), 0)} | {_pct(s.get('chain_bound_share'))} "
                       f"| {share} | {s['other_share_max']:.0%} "
                       f"| {'ok' if s['ok'] else 'FAILED'} |")
    out.append("(vs lower bound: makespan over max(hottest key's work, all work / the setup's shards), shards = "
               f"instances x {workloads['shards_per_instance']}. hot-key link gap: median time from a link of the "
               "hottest key ending to the next one starting; claimed late: links claimed only after their "
               "predecessor ended, so the chain waited for a claim. commit ms: median time of a one-row autocommit "
               "update on the same database during the run (bench/commit_probe.py); chain bound: the hottest key's "
               "tasks as that many commits in a row, the fastest the run could have ended; share of bound: that "
               "time over the run's span, issue 17's target for Zipf keys is >= 80 %)")
    return out


def render_summary(results: dict[str, Any]) -> str:
    from bench.report import machine_line

    out = [f"taskomatic multihost benchmark, {results['suite']} suite, seed {results['seed']}, "
           f"{results['started_at']}, {results['wall_s']:.0f} s",
           f"Machine: {machine_line(results['machine'])}"]
    settings = results["settings"]
    mh = settings["multihost"]
    which = "default settings" if settings["defaults"] else "overrides " + ", ".join(settings["overrides"])
    out.append(f"Daemon: {which}"
               f" (lease_seconds {mh['lease_seconds']:g}, lease_renew_interval {mh['lease_renew_interval']:g}); "
               f"{SHARDS} shards per instance")
    takeover = results.get("takeover")
    if takeover:
        runs = takeover["runs"]
        renew = results["settings"]["multihost"]["lease_renew_interval"]
        out += ["", f"1. Takeover after kill -9 of one of {takeover['instances']} instances "
                    f"({takeover['repeats']} repetition{'s' if takeover['repeats'] != 1 else ''}; "
                    f"{takeover['workload']['description']})",
                f"   instances started a random 0 to {renew:g} s apart; killed once every instance had held partitions "
                f"for {takeover['hold_s']:g} s plus a random 0 to {renew:g} s (one renewal interval);",
                "   seconds from t0 = SELECT clock_timestamp() right after the SIGKILL, on the database clock", ""]
        rows = [("(a) another instance holds its first partition", "first_partition_s"),
                ("(b) first task of its partitions starts elsewhere", "first_task_s"),
                ("(c) all its partitions moved", "all_partitions_s"),
                ("its lease had left at the kill", "victim_lease_left_at_kill_s"),
                ("its in-flight tasks all settled", "in_flight_settled_s")]
        out.append(f"| {'figure':<44} | {'min':>6} | {'median':>6} | {'max':>6} | per run")
        out.append(f"|{'-' * 46}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 20}")
        for title, name in rows:
            s = takeover["summary"][name]
            per = ", ".join(_s(r.get(name)) for r in runs)
            out.append(f"| {title:<44} | {_s(s['min']):>6} | {_s(s['median']):>6} | {_s(s['max']):>6} | {per}")
        parts = ", ".join(str(r.get("partitions_at_kill")) for r in runs)
        running = ", ".join(str(r.get("victim_tasks_running_at_kill")) for r in runs)
        rounds = ", ".join(str(r.get("takeover_transactions")) for r in runs)
        busy = ", ".join(f"{r['machine_busy_share_until_moved']:.0%}" if r.get("machine_busy_share_until_moved")
                         is not None else "-" for r in runs)
        out += ["", f"partitions held by the killed instance: {parts}; its tasks running at the kill: {running}; "
                    f"takeover transactions that moved them: {rounds}",
                f"machine busy (all processes, all cores) from the kill until its partitions moved: {busy}"]
        failed = {name for r in runs for name, ok in r.get("checks", {}).items() if not ok}
        errors = [r["error"].splitlines()[0] for r in runs if r.get("error")]
        out.append("correctness (every task ended once, per-key order, no start before its partition moved, "
                   "tokens increased, nothing held after the survivors stopped, no rejoin): "
                   + ("ok in every run" if takeover["ok"] else f"FAILED: {sorted(failed)} {errors}"))
    scaling = results.get("scaling")
    if scaling:
        w = scaling["workload"]
        out += ["", f"2. Scaling over instances: {w['description']}, {scaling['shards_per_instance']} shards per "
                    f"instance, {scaling['repeats']} run(s) per setup (median)",
                f"   NOTE: {scaling['note']}.", ""]
        out.append("| setup | tasks/s | vs SA | tkm CPU s/1k | PG CPU s/1k | PG vs SA | leases taken | xact/task "
                   "| pause s | share per instance | busiest shard | idle tail | other load | checks |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")
        for s in scaling["summary"]:
            share = " / ".join(f"{v:.0%}" for v in s["share_per_instance"] or [])
            out.append(f"| {s['setup']} | {_s(s['throughput_tps'], 0)} | {_s(s['throughput_vs_standalone'])} "
                       f"| {_s(s['taskomatic_cpu_s_per_1k'], 3)} | {_s(s['postgres_cpu_s_per_1k'], 3)} "
                       f"| {_s(s.get('postgres_cpu_vs_standalone'))} | {_s(s.get('partition_acquisitions'), 0)} "
                       f"| {_s(s['db_transactions_per_task'], 1)} | {_s(s['longest_pause_s'])} "
                       f"| {share} | {_s(s.get('busiest_shard_load'))} | {_pct(s.get('idle_tail_share'))} "
                       f"| {s['other_share_max']:.0%} | {'ok' if s['ok'] else 'FAILED'} |")
        out.append("(SA: the standalone instance with the same routing. CPU from the burst to the last end. Leases "
                   "taken: partition leases handed out (P when the first instance starts, then one per partition that "
                   "moves). xact/task: database transactions "
                   "(commits and rollbacks, pg_stat_database, the bench's few included) per task. Pause s: the longest "
                   "time no task ran on any instance although tasks were queued. Busiest shard: the most tasks one "
                   "shard ran over an even share of the setup's shards. Idle tail: from the first instance's last end "
                   "to the run's, as a share of the run. "
                   "Other load: CPU of every other process on the machine during the run, "
                   "as a share of all cores; a large share means the figures are disturbed)")
    join = results.get("join")
    if join:
        out += ["", f"3. Join and leave under load ({join['repeats']} repetition{'s' if join['repeats'] != 1 else ''};"
                    f" {join['workload']['description']}): a second instance joins one that holds every partition and "
                    "is busy, then leaves gracefully (SIGTERM); seconds on the database clock", "",
                "| figure | min | median | max |", "|---|---:|---:|---:|"]
        for title, name in (("its first partition, after it registered", "first_partition_s"),
                            ("its first task started", "first_task_s"),
                            ("it holds its even share", "even_share_s"),
                            ("after its SIGTERM: the other holds every partition again", "all_back_after_leave_s")):
            s = join["summary"][name]
            out.append(f"| {title} | {_s(s['min'])} | {_s(s['median'])} | {_s(s['max'])} |")
        not_held = sorted({name for r in join["runs"] for name, ok in r.get("checks", {}).items() if not ok})
        join_errors = [r["error"].splitlines()[0] for r in join["runs"] if r.get("error")]
        out.append("correctness (every task ended exactly once, per-key order, tokens increased, clean stops, "
                   "nothing held after): "
                   + ("ok in every run" if join["ok"] else f"FAILED: {not_held} {join_errors}"))
    if results.get("workloads"):
        out += render_workloads(results["workloads"])
    targets = target_rows(results)
    if targets:
        out += ["", "Targets (issue 13):", "", "| target | measured | met |", "|---|---|---|"]
        out += [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in targets]
    return "\n".join(out)


def _paired(setup: dict[str, Any]) -> str:
    """' (paired by pass: median 0.85x, 0.70x-1.00x over 10)': the ratios of runs of the same pass, if several."""
    ratio, span = setup.get("paired_throughput_ratio"), setup.get("paired_throughput_ratio_range")
    if ratio is None or not span or setup.get("runs", 1) < 2:
        return ""
    return f" (paired by pass: median {ratio:.2f}x, {span[0]:.2f}x-{span[1]:.2f}x over {setup['runs']} runs)"


def target_rows(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, what was measured, met) for the issue's multihost targets this run measured."""
    rows: list[tuple[str, str, bool]] = []
    scaling = results.get("scaling")
    summary = scaling["summary"] if scaling else []
    for routing in (scaling or {}).get("routings", []):
        mine = {s["instances"]: s for s in summary if s["mode"] == "multihost" and s.get("routing") == routing}
        one, three = mine.get(1), mine.get(3)
        if one and one.get("throughput_vs_standalone") is not None:
            rows.append((f"one multihost instance >= 0.8x standalone ({routing})",
                         f"{one['throughput_vs_standalone']:.2f}x{_paired(one)}",
                         one["throughput_vs_standalone"] >= 0.8))
        if three and three.get("throughput_vs_standalone") is not None:
            spread = three.get("share_spread")
            rows.append((f"3 instances together >= 0.8x standalone, each within 15 % of an even share ({routing})",
                         f"{three['throughput_vs_standalone']:.2f}x{_paired(three)}, largest deviation from an even "
                         "share "
                         f"{_s((spread or 0) * 100, 0)} %",
                         three["throughput_vs_standalone"] >= 0.8 and spread is not None and spread <= 0.15))
        pg = [s["postgres_cpu_vs_standalone"] for s in mine.values() if s.get("postgres_cpu_vs_standalone")]
        if pg:
            rows.append((f"PostgreSQL CPU per task in multihost <= 1.5x standalone ({routing})",
                         f"{min(pg):.2f}x to {max(pg):.2f}x (1 to {max(mine)} instances)", max(pg) <= 1.5))
    takeover = results.get("takeover")
    renew = results["settings"]["multihost"].get("lease_renew_interval")
    lease = results["settings"]["multihost"].get("lease_seconds")
    if takeover and takeover["summary"]["first_task_s"]["max"] is not None and renew and lease:
        worst = takeover["summary"]["all_partitions_s"]["max"]
        rows.append((f"takeover after kill -9 <= lease + one renewal interval ({lease + renew:g} s)",
                     f"all partitions moved after at most {_s(worst)} s, first task elsewhere after "
                     f"{_s(takeover['summary']['first_task_s']['max'])} s",
                     worst is not None and worst <= lease + renew))
    join = results.get("join")
    if join and join["summary"]["first_task_s"]["max"] is not None and renew:
        worst = join["summary"]["first_task_s"]["max"]
        rows.append((f"a joining instance runs its first task within two renewal intervals ({2 * renew:g} s) "
                     "under load", f"at most {_s(worst)} s after it registered", worst <= 2 * renew))
    return rows


def plot_scaling(results: dict[str, Any], path: Path) -> Path | None:
    """Throughput and CPU per task (taskomatic, PostgreSQL) over the setups, one bar per routing; None
    without data."""
    scaling = results.get("scaling")
    if not scaling or not scaling.get("summary"):
        return None
    try:
        import matplotlib

        style.setup(matplotlib)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [s for s in scaling["summary"] if s.get("throughput_tps")]
    if not rows:
        return None
    routings: list[str | None] = [r for r in ("pinned", "hash") if any(s.get("routing") == r for s in rows)]
    routings = routings or [None]  # results from before the routing dimension
    def setup_of(s: dict[str, Any]) -> tuple[str, Any]:  # results from before the routing dimension: the label
        return (s["mode"], s["instances"]) if "instances" in s else (s["mode"], s["setup"])

    setups = list(dict.fromkeys(setup_of(s) for s in rows))
    names = ["standalone" if mode == "standalone" else n if isinstance(n, str) else f"{n} multihost"
             for mode, n in setups]
    width = 0.8 / len(routings)
    fig, axes = plt.subplots(1, 3, figsize=style.figsize(3, 1, 4.6, 4.2))
    panels = (("throughput_tps", "no-op tasks/s (median of runs)", "throughput"),
              ("taskomatic_cpu_s_per_1k", "taskomatic CPU s per 1,000 tasks", "daemon CPU per task"),
              ("postgres_cpu_s_per_1k", "PostgreSQL CPU s per 1,000 tasks", "database CPU per task"))
    for ax, (field, ylabel, title) in zip(axes, panels, strict=True):
        for j, routing in enumerate(routings):
            family = routing or "multihost"
            values = [next((s.get(field) or 0 for s in rows if setup_of(s) == setup
                            and s.get("routing") == routing), 0) for setup in setups]
            xs = [i + (j - (len(routings) - 1) / 2) * width for i in range(len(setups))]
            ax.bar(xs, values, width, color=style.colour(family, family), label=style.family_label(family))
            if field == "throughput_tps":
                for x, v in zip(xs, values, strict=True):
                    ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(setups)), names)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels))
    fig.suptitle(f"{scaling['workload']['description']}, {scaling['shards_per_instance']} shards per instance")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return style.save(fig, path)
