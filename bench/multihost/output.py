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


def takeover_line(r: dict[str, Any]) -> str:
    if r.get("first_key_s") is None and r.get("error"):
        return f"  takeover {r['repetition']}: FAILED: {r['error'].splitlines()[0]}"
    verdict = "checks ok" if r["ok"] else f"CHECKS FAILED {[k for k, v in r.get('checks', {}).items() if not v]}"
    error = f" ({r['error'].splitlines()[0]})" if r.get("error") else ""
    return (f"  takeover {r['repetition']}: {r.get('keys_at_kill')} keys; first key {_s(r.get('first_key_s'))} s, "
            f"first task {_s(r.get('first_task_s'))} s, all keys {_s(r.get('all_keys_s'))} s after the kill "
            f"(its lease had {_s(r.get('victim_lease_left_at_kill_s'))} s left); {verdict}{error}")


def scaling_line(r: dict[str, Any]) -> str:
    if r.get("throughput_tps") is None:
        return f"  scaling {r['setup']}: FAILED: {(r.get('error') or '?').splitlines()[0]}"
    verdict = "checks ok" if r["ok"] else f"CHECKS FAILED {[k for k, v in r.get('checks', {}).items() if not v]}"
    return (f"  scaling {r['setup']}: {r['throughput_tps']:.0f} tasks/s, shares "
            f"{'/'.join(f'{s:.0%}' for s in r['share_per_instance'])}; {verdict}")


def render_summary(results: dict[str, Any]) -> str:
    from bench.report import machine_line

    out = [f"taskomatic multihost benchmark, {results['suite']} suite, seed {results['seed']}, "
           f"{results['started_at']}, {results['wall_s']:.0f} s",
           f"Machine: {machine_line(results['machine'])}"]
    settings = results["settings"]
    mh = settings["multihost"]
    which = "default settings" if settings["defaults"] else "overrides " + ", ".join(settings["overrides"])
    out.append(f"Daemon: {which}"
               f" (lease_seconds {mh['lease_seconds']:g}, lease_renew_interval {mh['lease_renew_interval']:g}, "
               f"keys_per_shard {mh['keys_per_shard']}, tasks_per_key {mh['tasks_per_key']}); "
               f"{SHARDS} shards per instance")
    takeover = results.get("takeover")
    if takeover:
        runs = takeover["runs"]
        renew = results["settings"]["multihost"]["lease_renew_interval"]
        out += ["", f"1. Takeover after kill -9 of one of {takeover['instances']} instances "
                    f"({takeover['repeats']} repetition{'s' if takeover['repeats'] != 1 else ''}; "
                    f"{takeover['workload']['description']})",
                f"   instances started a random 0 to {renew:g} s apart; killed once every instance had held keys "
                f"for {takeover['hold_s']:g} s plus a random 0 to {renew:g} s (one renewal interval);",
                "   seconds from t0 = SELECT clock_timestamp() right after the SIGKILL, on the database clock", ""]
        rows = [("(a) another instance holds its first key", "first_key_s"),
                ("(b) first task of its keys starts elsewhere", "first_task_s"),
                ("(c) all its keys moved", "all_keys_s"),
                ("its lease had left at the kill", "victim_lease_left_at_kill_s"),
                ("its in-flight tasks all settled", "in_flight_settled_s")]
        out.append(f"| {'figure':<44} | {'min':>6} | {'median':>6} | {'max':>6} | per run")
        out.append(f"|{'-' * 46}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 20}")
        for title, name in rows:
            s = takeover["summary"][name]
            per = ", ".join(_s(r.get(name)) for r in runs)
            out.append(f"| {title:<44} | {_s(s['min']):>6} | {_s(s['median']):>6} | {_s(s['max']):>6} | {per}")
        keys = ", ".join(str(r.get("keys_at_kill")) for r in runs)
        running = ", ".join(str(r.get("victim_tasks_running_at_kill")) for r in runs)
        rounds = ", ".join(str(r.get("takeover_transactions")) for r in runs)
        busy = ", ".join(f"{r['machine_busy_share_until_moved']:.0%}" if r.get("machine_busy_share_until_moved")
                         is not None else "-" for r in runs)
        out += ["", f"keys held by the killed instance: {keys}; its tasks running at the kill: {running}; "
                    f"takeover transactions that moved them: {rounds}",
                f"machine busy (all processes, all cores) from the kill until its keys moved: {busy}"]
        failed = {name for r in runs for name, ok in r.get("checks", {}).items() if not ok}
        errors = [r["error"].splitlines()[0] for r in runs if r.get("error")]
        out.append("correctness (every task ended once, per-key order, no start before its key moved, tokens "
                   "increased, no claims left, no rejoin): "
                   + ("ok in every run" if takeover["ok"] else f"FAILED: {sorted(failed)} {errors}"))
    scaling = results.get("scaling")
    if scaling:
        w = scaling["workload"]
        out += ["", f"2. Scaling over instances: {w['description']}, {scaling['shards_per_instance']} shards per "
                    f"instance, {scaling['repeats']} run(s) per setup (median)",
                f"   NOTE: {scaling['note']}.", ""]
        out.append(f"| {'setup':<12} | {'tasks/s':>8} | {'vs SA':>6} | {'tkm CPU s/1k':>12} | {'PG CPU s/1k':>11} "
                   f"| {'key claims/1k':>13} | {'xact/task':>9} | {'pause s':>7} | share per instance | other load "
                   "| checks")
        out.append(f"|{'-' * 14}|{'-' * 10}|{'-' * 8}|{'-' * 14}|{'-' * 13}|{'-' * 15}|{'-' * 11}|{'-' * 9}|{'-' * 20}"
                   f"|{'-' * 12}|{'-' * 8}")
        for s in scaling["summary"]:
            share = " / ".join(f"{v:.0%}" for v in s["share_per_instance"] or [])
            out.append(f"| {s['setup']:<12} | {_s(s['throughput_tps'], 0):>8} | {_s(s['throughput_vs_standalone']):>6} "
                       f"| {_s(s['taskomatic_cpu_s_per_1k'], 3):>12} | {_s(s['postgres_cpu_s_per_1k'], 3):>11} "
                       f"| {_s(s['key_claims_per_1k'], 1):>13} | {_s(s['db_transactions_per_task'], 1):>9} "
                       f"| {_s(s['longest_pause_s']):>7} "
                       f"| {share:<18} | {s['other_share_max']:>10.0%} "
                       f"| {'ok' if s['ok'] else 'FAILED'}")
        out.append("(SA: the standalone instance. CPU from the burst to the last end. Key claims: tokens handed out "
                   "(claims and takeovers). xact/task: database transactions "
                   "(commits and rollbacks, pg_stat_database, the bench's few included) per task. Pause s: the longest "
                   "time no task ran on any instance although tasks were queued. "
                   "Other load: CPU of every other process on the machine during the run, "
                   "as a share of all cores; a large share means the figures are disturbed)")
    return "\n".join(out)


def plot_scaling(results: dict[str, Any], path: Path) -> Path | None:
    """Throughput and database transactions per task over the scaling setups, as a PNG; None without data."""
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
    labels = [s["setup"] for s in rows]
    colours = [style.colour(s["setup"], s["mode"], s.get("instances")) for s in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=style.figsize(2, 1, 6.0, 4.4))
    left.bar(labels, [s["throughput_tps"] for s in rows], color=colours)
    for i, s in enumerate(rows):
        left.text(i, s["throughput_tps"], f"{s['throughput_tps']:,.0f}", ha="center", va="bottom", fontsize=9)
    left.set_ylabel("no-op tasks/s (median of runs)")
    left.set_xlabel("setup (instances)")
    left.set_title("throughput: standalone vs multihost")
    right.bar(labels, [s.get("db_transactions_per_task") or 0 for s in rows], color=colours)
    right.set_ylabel("database transactions per task")
    right.set_xlabel("setup (instances)")
    right.set_title("what coordination costs")
    from matplotlib.patches import Patch

    families = sorted({style.family_of(s["setup"], s["mode"]) for s in rows})
    fig.legend([Patch(color=style.colour(f, f)) for f in families], [style.family_label(f) for f in families],
               loc="lower center", ncol=len(families))
    fig.suptitle(f"{scaling['workload']['description']}, {scaling['shards_per_instance']} shards per instance")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return style.save(fig, path)

