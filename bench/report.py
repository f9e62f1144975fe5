"""Render a results.json: a Markdown report and PNG plots (``bench/report_plots.py``; matplotlib, optional).

``python -m bench.report bench/results/<dir>/results.json`` re-renders one.
``python -m bench.report --plots-only bench/RESULTS/results.json.gz`` re-draws the stored PNGs only.
Every number shown comes from the JSON, which holds only measured figures
(and the workload's planned work, for the lower bound).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

from bench.report_plots import plot, scaling_workloads, timeline_runs

BASELINES_NOTE = ("The baselines (the original poll loop and the SKIP LOCKED pool) do not run the lifecycle "
                  "workloads: they only know the bench's noop and sleep actions, so these runs have no baseline "
                  "figures and no ratios.")


def _fmt(value: Any, spec: str = ".1f", missing: str = "-") -> str:
    if value is None:
        return missing
    return format(value, spec)


def _ratio(run: dict[str, Any], which: str, figure: str) -> str:
    value = (run.get("ratios", {}).get(which) or {}).get(figure)
    return "-" if value is None else f"{value:.2f}x"


def _max_rss_mb(run: dict[str, Any], prefix: str) -> float | None:
    values = [p["peak_rss_kb"] for p in (run.get("rss") or {}).get("runner", []) if p["role"].startswith(prefix)]
    return max(values) / 1024.0 if values else None


def summary_table(results: dict[str, Any]) -> str:
    """One row per run; ratios are this run's figure divided by the baseline's, same workload, same suite run."""
    head = ("| workload | runner | tasks/s | xorig | xpool | p50 ms | p95 ms | p99 ms | p99 xpool | makespan/LB "
            "| runner CPU s/1k | PG CPU s/1k | order |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results["runs"]:
        if r.get("error") and "latency_ms" not in r:
            lines.append(f"| {r['workload']} | {r['label']} | FAILED: {r['error'].splitlines()[0]} |"
                         + " |" * 10)
            continue
        lat = r.get("latency_ms") or {}
        cpu = r.get("cpu") or {}
        order = r.get("order") or {}
        if order.get("ok"):
            order_text = "ok"
        elif r["runner"] == "pool":
            order_text = f"none promised ({order.get('violations', '?')} out of order)"
        else:
            order_text = f"VIOLATED ({order.get('violations', '?')})"
        lines.append(
            f"| {r['workload']} | {r['label']} | {_fmt(r.get('throughput_tps'), ',.0f')} "
            f"| {_ratio(r, 'vs_original', 'throughput_tps')} | {_ratio(r, 'vs_pool', 'throughput_tps')} "
            f"| {_fmt(lat.get('p50'))} | {_fmt(lat.get('p95'))} | {_fmt(lat.get('p99'))} "
            f"| {_ratio(r, 'vs_pool', 'latency_p99_ms')} "
            f"| {_fmt(r.get('makespan_ratio'), '.2f')} "
            f"| {_fmt(cpu.get('runner_s_per_1k'), '.2f')} | {_fmt(cpu.get('postgres_s_per_1k'), '.2f')} "
            f"| {order_text}{'' if r.get('complete') else ' (INCOMPLETE)'} |")
    return "\n".join(lines)


def machine_line(m: dict[str, Any]) -> str:
    mem = f"{m['memory_kb'] / 1024 / 1024:.1f} GiB" if m.get("memory_kb") else "? GiB"
    pgs = m.get("postgresql_settings", {})
    dirty = " (with uncommitted changes)" if m.get("commit_dirty") else ""
    return (f"{m.get('cpu_model')}, {m.get('cores')} cores ({m.get('cores_usable')} usable), {mem}; "
            f"Linux {m.get('kernel')} ({m.get('os')}); Python {m.get('python')}; PostgreSQL {m.get('postgresql')} "
            f"(fsync {pgs.get('fsync')}, synchronous_commit {pgs.get('synchronous_commit')}, "
            f"shared_buffers {pgs.get('shared_buffers')}); commit {str(m.get('commit'))[:12]}{dirty}")


def _settings_line(results: dict[str, Any]) -> str:
    settings = results.get("settings", {})
    config = settings.get("daemon_config") or {}
    shown = ", ".join(f"{k} {config[k]}" for k in ("poll_interval", "claim_batch", "max_claimed_per_shard",
                                                     "log_level") if k in config)
    overrides = ", ".join(settings.get("daemon_settings") or []) or "none"
    return (f"Daemon: default settings ({shown}); overrides: {overrides}. Baselines poll every "
            f"{settings.get('baseline_poll_s')} s when idle.")


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    m = results["machine"]
    out = [f"# taskomatic benchmark: {results['suite']} suite", "",
           f"Run {results['started_at']}, seed {results['seed']}, {results['wall_s']:.0f} s in all.",
           "", f"Machine: {machine_line(m)}.", "", _settings_line(results), ""]
    checks = results["checks"]
    out += ["## Checks", "",
            f"* every run complete (all tasks ended, runner stopped cleanly): **{checks['all_runs_complete']}**",
            f"* every task finished: **{checks['all_tasks_finished']}**",
            f"* per-key order held in every taskomatic run (SQL check): **{checks['taskomatic_order_ok']}**",
            f"* per-key order held by the runners that promise it (taskomatic, original): "
            f"**{checks['ordered_runners_order_ok']}** (the SKIP LOCKED pool promises none; its count is shown)"]
    if "lifecycle_consistent" in checks:
        out.append(f"* lifecycle runs: every task finished once, VM rows agree with their last task and with the "
                   f"libvirt domains on the nodes: **{checks['lifecycle_consistent']}**")
    out += [_foreign_line(results), ""]
    out += ["## Workloads", "", "| workload | what | total work s | heaviest key work s | tasks on hottest key |",
            "|---|---|---|---|---|"]
    for w in results["workloads"]:
        out.append(f"| {w['name']} | {w['description']} | {_fmt(w['total_work_s'], '.2f', 'measured')} "
                   f"| {_fmt(w['heaviest_key_work_s'], '.2f', 'measured')} | {w['heaviest_key_tasks']} |")
    if any(w.get("work_measured") for w in results["workloads"]):
        out += ["", "Lifecycle workloads: the work of a real VM action is not known in advance; each run's lower "
                "bound is computed from the measured time_started -> time_ended of its tasks (section below). "
                + BASELINES_NOTE]
    out += ["", "## Results", "",
            "xorig and xpool: this run's figure divided by the same figure of the original design and of the "
            "SKIP LOCKED pool with the same number of workers (or its largest), measured in this suite run "
            "on the same workload. Throughput: tasks / (last time_ended - first time_started). Latency: "
            "created_at -> time_started. makespan/LB: (last time_ended - first created_at) / max(heaviest key's "
            "work, total work / shards); for the pool, whose order is not per key, max(longest task, total / "
            "workers). CPU: seconds of the runner's process group and of PostgreSQL (postmaster and every "
            "process under it, the bench's own progress queries included) per 1,000 tasks, from the first "
            "insert to the last end.", "", summary_table(results), ""]
    out += _scaling_section(results)
    out += routing_section(results)
    out += _lifecycle_section(results)
    out += chain_section(results)
    out += makespan_section(results)
    out += _utilisation_section(results)
    out += _timeline_section(results)
    out += _rss_section(results)
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    else:
        out += ["(No plots: matplotlib is not installed or --no-plots was given.)", ""]
    return "\n".join(out)


FOREIGN_LOAD_WARN = 0.10


def _foreign_line(results: dict[str, Any]) -> str:
    """How much of the machine other processes used during the runs (a disturbed run is not comparable)."""
    shares: list[tuple[float, dict[str, Any]]] = []
    for r in results["runs"]:
        value = (r.get("cpu") or {}).get("other_share")
        if value is not None:
            shares.append((float(value), r))
    if not shares:
        return "* other load on the machine: not measured"
    worst = max(v for v, _ in shares)
    suspect = [f"{r['workload']} / {r['label']} ({v:.0%})" for v, r in shares if v >= FOREIGN_LOAD_WARN]
    text = (f"* other processes' CPU during the runs (machine busy time minus runner, PostgreSQL, libvirt nodes "
            f"and bench), as a share of all cores: at most **{worst:.0%}**")
    if suspect:
        text += f"; runs disturbed by more than {FOREIGN_LOAD_WARN:.0%}: " + ", ".join(suspect)
    return text


def _scaling_section(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for workload in scaling_workloads(results):
        runs = [r for r in results["runs"] if r["workload"] == workload]
        original = next((r for r in runs if r["runner"] == "original"), None)
        counts = sorted({r["parallelism"] for r in runs if r["runner"] != "original"})
        lines += [f"## Scaling over shards: {workload}", "",
                  "| shards / workers | taskomatic tasks/s | pool tasks/s | taskomatic / pool | "
                  "taskomatic / original |", "|---|---|---|---|---|"]
        for n in counts:
            # The default routing's run (pinned; a run from before the routing dimension has none).
            mine = next((r for r in runs if r["runner"] == "taskomatic" and r["parallelism"] == n
                         and r.get("routing") != "hash"), None)
            pool = next((r for r in runs if r["runner"] == "pool" and r["parallelism"] == n), None)
            t = mine.get("throughput_tps") if mine else None
            p = pool.get("throughput_tps") if pool else None
            o = original.get("throughput_tps") if original else None
            lines.append(f"| {n} | {_fmt(t, ',.0f')} | {_fmt(p, ',.0f')} | "
                         f"{_fmt(t / p if t and p else None, '.2f')} | {_fmt(t / o if t and o else None, '.2f')} |")
        if original:
            lines.append(f"\nOriginal design (1 process): {_fmt(original.get('throughput_tps'), ',.0f')} tasks/s.")
        lines.append("")
    return lines


def routing_pairs(results: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pinned run, hash run) of each workload and shard count run with both routings, in run order."""
    pairs = []
    for r in results["runs"]:
        if r["runner"] == "taskomatic" and r.get("routing") == "pinned":
            other = next((h for h in results["runs"] if h["runner"] == "taskomatic" and h.get("routing") == "hash"
                          and h["workload"] == r["workload"] and h["parallelism"] == r["parallelism"]), None)
            if other is not None:
                pairs.append((r, other))
    return pairs


def routing_section(results: dict[str, Any]) -> list[str]:
    """Hash vs pinned routing side by side; nothing for a run without both (older results have no routing)."""
    pairs = routing_pairs(results)
    if not pairs:
        return []
    lines = ["## Routing: hash vs pinned", "",
             "The same workload and shard count through the daemon with `--routing pinned` (a free key goes to "
             "the first shard with room) and `--routing hash` (partition p = hash(key) mod P always runs on "
             "shard p mod N). hash / pinned above 1 means hash routing did more tasks/s; for makespan/LB and "
             "p99, below 1 means hash routing finished (or started tasks) sooner.", "",
             "| workload | shards | pinned tasks/s | hash tasks/s | hash / pinned tasks/s | pinned makespan/LB "
             "| hash makespan/LB | hash / pinned makespan | pinned p99 ms | hash p99 ms | order |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for pinned, hashed in pairs:
        tp, th = pinned.get("throughput_tps"), hashed.get("throughput_tps")
        mp, mh = pinned.get("makespan_ratio"), hashed.get("makespan_ratio")
        ok = all((r.get("order") or {}).get("ok") for r in (pinned, hashed))
        complete = all(r.get("complete") for r in (pinned, hashed))
        lines.append(
            f"| {pinned['workload']} | {pinned['parallelism']} | {_fmt(tp, ',.0f')} | {_fmt(th, ',.0f')} "
            f"| {_fmt(th / tp if tp and th else None, '.2f')} | {_fmt(mp, '.2f')} | {_fmt(mh, '.2f')} "
            f"| {_fmt(mh / mp if mp and mh else None, '.2f')} "
            f"| {_fmt((pinned.get('latency_ms') or {}).get('p99'))} "
            f"| {_fmt((hashed.get('latency_ms') or {}).get('p99'))} "
            f"| {'ok' if ok else 'VIOLATED'}{'' if complete else ' (INCOMPLETE)'} |")
    return [*lines, ""]


def chain_section(results: dict[str, Any]) -> list[str]:
    """The hottest key's chain in the no-op Zipf runs: the share of its bound, and its links beside the other
    keys' work and alone (the gap between the two is what the other work costs the chain)."""
    runs = [r for r in results["runs"] if r.get("chain_links", {}).get("key_id") is not None]
    if not runs:
        return []
    lines = ["## The hottest key's chain", "",
             "No-op runs on Zipf keys end with their hottest key's chain: one commit per link. Bound: its tasks "
             "times the p50 of a probe's commits during the run (bench/commit_probe.py). Links: one task's start "
             "to its successor's, in ms, while other keys still had tasks (beside other work) and after the last "
             "of them ended (alone); the probe's commits are split at the same moment. Each cell: count, p50, "
             "mean, p90. At mean commits: the share of the bound if each link is the mean of the probe's commits "
             "in its part of the run (n commits in a row take n times the mean, and under load the mean is well "
             "above the p50).", "",
             "| workload | runner | tasks/s | share of the bound | at mean commits | commit p50 ms "
             "| links beside other work | probe's commits then | links alone | probe's commits then |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        links = r["chain_links"]
        cells = []
        for part in ("shared", "commits_shared", "alone", "commits_alone"):
            f = links.get(part) or {"count": 0}
            cells.append(f"{f['count']}, {_fmt(f['p50_ms'], '.2f')}, {_fmt(f['mean_ms'], '.2f')}, "
                         f"{_fmt(f['p90_ms'], '.2f')}" if f["count"] else "-")
        lines.append(f"| {r['workload']} | {r['label']} | {_fmt(r.get('throughput_tps'), ',.0f')} "
                     f"| {_fmt((r.get('chain_bound') or {}).get('share_of_bound'), '.2f')} "
                     f"| {_fmt(links.get('share_at_mean_commits'), '.2f')} "
                     f"| {_fmt((r.get('commit_probe') or {}).get('p50_ms'), '.2f')} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def makespan_section(results: dict[str, Any]) -> list[str]:
    """Where each taskomatic burst's makespan goes beyond its planned work (bench.run_figures.makespan_parts)."""
    runs = [r for r in results["runs"] if r.get("makespan_parts")]
    if not runs:
        return []
    lines = ["## Where the makespan goes", "",
             "Seconds per shard, averaged over the shards, that add up to the makespan: the planned work, the wait "
             "from the first insert to the shard's first start, how much longer the actions ran than planned, "
             "the gaps between one task's end and the next one's start on the same shard (the commit that ends "
             "one and starts the next, and the messages around it), the shard's idle time after its last task, "
             "and shards that ran nothing. Gaps one by one: p50, mean and p90, in ms.", "",
             "| workload | runner | makespan s | / LB | planned | start | overrun | gaps | end idle | unused "
             "| gap ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        p = r["makespan_parts"]
        gap = p["gap_ms"]
        lines.append(f"| {r['workload']} | {r['label']} | {_fmt(r.get('makespan_s'), '.3f')} "
                     f"| {_fmt(r.get('makespan_ratio'), '.3f')} | {p['planned_per_shard_s']:.3f} "
                     f"| {p['start_s']:.3f} | {p['overrun_s']:.3f} | {p['gaps_s']:.3f} | {p['end_idle_s']:.3f} "
                     f"| {p['unused_s']:.3f} | {_fmt(gap['p50'], '.2f')}, {_fmt(gap['mean'], '.2f')}, "
                     f"{_fmt(gap['p90'], '.2f')} |")
    return [*lines, ""]


def _utilisation_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Utilisation", "",
             "Pool: the sum of every task's time_started -> time_ended over (workers x the first start -> last end "
             "window). Per shard: the same for each shard, the shard being the slot that marked each task "
             "running (tasks.run_by_shard; see the note).", "",
             "| workload | runner | pool | per shard | tasks per shard |", "|---|---|---|---|---|"]
    for r in results["runs"]:
        u = r.get("utilisation")
        if not u:
            continue
        per = ", ".join(f"{v:.2f}" for v in u["per_shard"]) if u.get("per_shard") else "-"
        tasks = ", ".join(str(v) for v in u.get("tasks_per_shard") or []) or "-"
        lines.append(f"| {r['workload']} | {r['label']} | {_fmt(u.get('pool'), '.2f')} | {per} | {tasks} |")
    notes = {r["utilisation"]["per_shard_note"] for r in results["runs"]
             if r.get("utilisation", {}).get("per_shard_note")}
    lines += [""] + [f"Note: {n}." for n in sorted(notes)] + [""]
    return lines


def _lifecycle_section(results: dict[str, Any]) -> list[str]:
    runs = [r for r in results["runs"] if "lifecycle" in r]
    if not runs:
        return []
    lines = ["## VM lifecycle on libvirt test nodes", "",
             "Two private libvirt nodes (a session libvirtd each, libvirt's test driver), one TEST host row "
             "each, and VMs 1..N; the tasks are a seeded mix of create/start/suspend/resume/save/restore/"
             "migrate/shutdown/poweroff, each valid from the state its VM's earlier tasks leave it in. "
             + BASELINES_NOTE, "",
             "Work = the measured time_started -> time_ended of each task (the action itself); "
             "LB = max(heaviest VM's measured work, total measured work / shards). Makespan = last time_ended - "
             "first created_at. Per-task time outside the action (claim, dispatch, precondition reads, state "
             "writes) is not work, so with actions this short the ratio mostly shows that overhead.", "",
             "| workload | runner | tasks/s | p50 / p99 ms | total work s | heaviest VM work s (tasks) | LB s "
             "| makespan s | makespan/LB | runner / PG / libvirtd CPU s per 1k | checks |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        work = r.get("measured_work") or {}
        lat = r.get("latency_ms") or {}
        cpu = r.get("cpu") or {}
        lc = r["lifecycle"]
        if lc["ok"]:
            checks = (f"ok: {lc['tasks'].get('failed', 0)} failed, {lc['vms']} VM rows = libvirt "
                      f"({lc['domains']} domains)")
        else:
            checks = (f"**FAILED**: {lc['tasks']}, {lc['vm_mismatches']} VM rows disagree"
                      + (f", libvirt: {lc['libvirt_error']}" if lc.get("libvirt_error") else ""))
        lines.append(
            f"| {r['workload']} | {r['label']} | {_fmt(r.get('throughput_tps'), ',.0f')} "
            f"| {_fmt(lat.get('p50'))} / {_fmt(lat.get('p99'))} | {_fmt(work.get('total_s'), '.2f')} "
            f"| {_fmt(work.get('heaviest_key_s'), '.3f')} ({work.get('heaviest_key_tasks', '-')}) "
            f"| {_fmt(r.get('lower_bound_s'), '.2f')} | {_fmt(r.get('makespan_s'), '.2f')} "
            f"| {_fmt(r.get('makespan_ratio'), '.2f')} | {_fmt(cpu.get('runner_s_per_1k'), '.2f')} / "
            f"{_fmt(cpu.get('postgres_s_per_1k'), '.2f')} / {_fmt(cpu.get('nodes_s_per_1k'), '.2f')} | {checks} |")
    for r in runs:
        for example in r["lifecycle"].get("vm_mismatch_examples") or []:
            lines.append(f"\n* {r['workload']} / {r['label']}: VM {example['vm']}: {example['why']}")
        for failure in r["lifecycle"].get("failures") or []:
            lines.append(f"\n* {r['workload']} / {r['label']}: task {failure['id']} ({failure['action']} "
                         f"VM {failure['vm']}) failed: {failure['message']}")
    actions = _ordered_actions(runs)
    lines += ["", "Action durations (time_started -> time_ended), ms: count, mean, p95.", "",
              "| workload | runner | " + " | ".join(actions) + " |", "|---|---|" + "---|" * len(actions)]
    for r in runs:
        per = r.get("action_ms") or {}
        cells = [f"{per[a]['count']}: {per[a]['mean_ms']:.1f}, {per[a]['p95_ms']:.1f}" if a in per else "-"
                 for a in actions]
        lines.append(f"| {r['workload']} | {r['label']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _ordered_actions(runs: list[dict[str, Any]]) -> list[str]:
    from bench.workloads import LIFECYCLE_ACTIONS

    seen = {a for r in runs for a in (r.get("action_ms") or {})}
    return [a for a in LIFECYCLE_ACTIONS if a in seen] + sorted(seen - set(LIFECYCLE_ACTIONS))


def _timeline_section(results: dict[str, Any]) -> list[str]:
    chosen = timeline_runs(results)
    if not chosen:
        return []
    lines = ["## Utilisation timeline", "",
             "One row per shard with its busy intervals (time_started -> time_ended of its tasks), and the tasks "
             "running and waiting (created_at -> time_started) over time, in seconds since the first task was "
             "queued. Each task is attributed to the shard slot that marked it running, as the tasks table "
             "records it (tasks.run_by_shard): a key is pinned to a shard only while it has tasks in flight "
             "there, so the key alone does not say which shard ran a task. The attribution is checked: a shard "
             "runs one task at a time, so two tasks of one shard that overlap are a daemon bug.", ""]
    for name, r in chosen:
        tl = r["timeline"]
        end = tl["end_s"]
        lines += [f"**{r['workload']} / {r['label']}** (`{name}`): makespan {end:.2f} s, lower bound "
                  f"{_fmt(r.get('lower_bound_s'), '.2f')} s ({r.get('lower_bound_from', 'planned work')}), "
                  f"attributed by {tl.get('attributed_by', 'router.shard_for')}, {_consistency(tl)}.",
                  "", "| shard | tasks | busy s | busy share of the makespan | last task ended at s |",
                  "|---|---|---|---|---|"]
        for i in range(tl["shards"]):
            last = tl["busy"][i][-1][1] if tl["busy"][i] else None
            share = tl["busy_s"][i] / end if end > 0 else None
            lines.append(f"| {i} | {tl['tasks_per_shard'][i]} | {tl['busy_s'][i]:.2f} | {_fmt(share, '.0%')} "
                         f"| {_fmt(last, '.2f')} |")
        lasts = [b[-1][1] for b in tl["busy"] if b]
        if len(lasts) > 1:
            lines.append(f"\nThe first shard to run out of work did at {min(lasts):.2f} s, the last at "
                         f"{max(lasts):.2f} s.")
        lines.append("")
    return lines


def _consistency(tl: dict[str, Any]) -> str:
    if tl["consistent"]:
        return "consistent (no two tasks of one shard overlap)"
    overlaps = sum(tl.get("overlaps") or [])
    outside = tl.get("out_of_range") or 0
    found = ", ".join(part for part in (f"{overlaps} tasks overlapping an earlier one of their shard" if overlaps
                                        else "", f"{outside} on a slot outside the run's" if outside else "")
                      if part)
    if tl.get("attributed_by", "router.shard_for").startswith("tasks."):
        return f"INCONSISTENT ({found or 'overlap within a shard'}: a shard ran two tasks at once, a daemon bug)"
    return f"INCONSISTENT ({found or 'overlap within a shard'}: the hash attribution does not hold)"


def _rss_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Peak RSS (VmHWM) per process, MB", "",
             "Runner processes by role (the largest of each role in the run). PostgreSQL backends count the "
             "shared buffers they touched, so theirs overstates private memory.", "",
             "| workload | runner | processes (role: peak MB) | largest PostgreSQL backend MB |", "|---|---|---|---|"]
    for r in results["runs"]:
        rss = r.get("rss")
        if not rss:
            continue
        by_role: dict[str, int] = {}
        for p in rss["runner"]:
            role = "shard" if p["role"].startswith("shard ") else p["role"]
            by_role[role] = max(by_role.get(role, 0), p["peak_rss_kb"])
        roles = ", ".join(f"{k}: {v / 1024:.1f}" for k, v in sorted(by_role.items()))
        backends = [p["peak_rss_kb"] for p in rss["postgres"] if p["role"] == "backend"]
        lines.append(f"| {r['workload']} | {r['label']} | {roles} | "
                     f"{_fmt(max(backends) / 1024 if backends else None, '.1f')} |")
    return [*lines, ""]


# -- plots ---------------------------------------------------------------------------------

def write(results: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    """report.md (+ the PNGs) into ``out``; the paths written."""
    written = plot(results, out) if plots else []
    report = out / "report.md"
    report.write_text(markdown(results, [p.name for p in written]))
    return [report, *written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description="re-render a results.json")
    parser.add_argument("results", type=Path)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--plots-only", action="store_true", help="re-draw the PNGs only, no report.md")
    args = parser.parse_args(argv)
    results = load(args.results)
    if args.plots_only:
        written = plot(results, args.results.parent)
        if not written:
            print("matplotlib is not installed: no plots (pip install -e '.[bench]')", file=sys.stderr)
            return 1
    else:
        written = write(results, args.results.parent, plots=not args.no_plots)
    for path in written:
        print(path)
    return 0


def load(path: Path) -> dict[str, Any]:
    """A results.json, gzipped (results.json.gz, as bench/RESULTS/ keeps it) or not."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())


if __name__ == "__main__":
    sys.exit(main())

