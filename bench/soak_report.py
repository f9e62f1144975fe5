"""The soak's Markdown summary and plots (``bench/soak.py`` writes them; ``python -m bench.soak_report
<soak.json>`` re-renders them from the JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench import style


def _mib(kb: float | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _backlog(samples: dict[str, Any], end: float) -> str:
    """Peak and mean of queued + running over the load window's samples."""
    tasks = samples["tasks"]
    values = [q + r for t, q, r in zip(samples["t"], tasks["queued"], tasks["running"], strict=True) if t <= end]
    if not values:
        return "-"
    return f"peak {max(values):,}, mean {sum(values) / len(values):,.0f} over the load window"


def _cpu(r: dict[str, Any]) -> str:
    c = r.get("cpu")
    if not c:
        return ""
    return (f" CPU over the load window: taskomatic {c['daemon_s']:.0f} s ({c['daemon_s_per_1k']:.2f} s per 1,000 "
            f"tasks), PostgreSQL {c['postgres_s']:.0f} s, libvirt nodes {c['nodes_s']:.0f} s, the bench "
            f"{c['bench_s']:.0f} s; all cores {c['machine_busy_share']:.0%} busy, "
            f"**other processes (foreign load) {c['other_share']:.0%} of all cores**.")


def _ready(r: dict[str, Any]) -> str:
    ready = r.get("ready_wait_ms")
    if not ready:
        return ""
    return (f"wait after ready (its VM's previous task ended) p50 {_num(ready.get('p50'), 1)} ms, "
            f"p99 {_num(ready.get('p99'), 1)} ms, max {_num(ready.get('max'), 1)} ms; ")


def summary(results: dict[str, Any]) -> str:
    from bench.report import machine_line
    from bench.soak_verdicts import verdict_flags

    w = results["workload"]
    out = [f"# taskomatic soak ({results['size']}), seed {results['seed']}, {results['started_at']}, "
           f"{results['wall_s']:.0f} s in all", "",
           f"Machine: {machine_line(results['machine'])}", "",
           f"Workload: {w['description']}. Actions: "
           + ", ".join(f"{a} {n:,}" for a, n in w["actions"].items()) + ".", "",
           f"Command: `{results['settings']['command']}`; daemon overrides: "
           f"{', '.join(results['settings']['overrides']) or 'none (defaults)'}; "
           f"sampled every {results['settings']['interval_s']:g} s.", ""]
    for r in results["runs"]:
        out += [f"## {r['setup']}: {r['label']}, queued at {r['rate_tps']:g} tasks/s", ""]
        if r.get("error"):
            out += [f"**ERROR**: {r['error'].splitlines()[0]}", ""]
        if "verdicts" not in r:
            continue
        v = r["verdicts"]
        lat = r.get("latency_ms") or {}
        out += [f"{r['tasks']:,} tasks over {r['vms']:,} VMs; first queued to last ended "
                f"{_num(r.get('duration_s'), 1)} s; throughput {_num(r.get('throughput_tps'), 1)} tasks/s "
                f"(first start to last end); queue-to-start latency p50 {_num(lat.get('p50'), 1)} ms, "
                f"p99 {_num(lat.get('p99'), 1)} ms, max {_num(lat.get('max'), 1)} ms; "
                f"{_ready(r)}"
                f"load window 0-{v['load_window_s'][1]:.1f} s, {len(r['samples']['t'])} samples; "
                f"unsettled tasks (queued + running) {_backlog(r['samples'], v['load_window_s'][1])}; "
                f"task states {r.get('task_states')}.{_cpu(r)}", "",
                "| verdict | result |", "|---|---|"]
        for name, ok in verdict_flags(v).items():
            out.append(f"| {name} | {'ok' if ok else '**FAILED**'} |")
        b = v["backlog"]
        out += ["", f"Backlog at the end: {b['queued']} queued, {b['running']} running; {b['ended']:,} ended of "
                    f"{b['inserted']:,} queued. Restarts: {v['restarts'] or 'none'}. Per-key order: "
                    f"{v['order']['violations']} violations over {v['order']['keys']:,} keys. VM rows: "
                    f"{v['lifecycle']['vms']:,}, {v['lifecycle']['vm_mismatches']} disagree with the "
                    f"{v['lifecycle']['domains']:,} domains; tasks {v['lifecycle']['tasks']}.", "",
                "RSS per process (MiB; slopes in MiB/min over the middle and last third of the load window):", "",
                "| process | start | peak | end | middle-third peak | last-third peak | middle slope | last slope "
                "| levels off |", "|---|---|---|---|---|---|---|---|---|"]
        for role, m in list(v["memory"].items()) + [(f"libvirtd {n} (info)", m) for n, m in
                                                    v["nodes_memory"].items()]:
            slope_mid = m["middle_slope_kb_per_min"]
            slope_last = m["last_slope_kb_per_min"]
            verdict = "-" if m["growing"] is None else ("**no: grows**" if m["growing"] else "yes")
            out.append(f"| {role} | {_mib(m['start_kb'])} | {_mib(m['peak_kb'])} | {_mib(m['end_kb'])} "
                       f"| {_mib(m['middle_peak_kb'])} | {_mib(m['last_peak_kb'])} "
                       f"| {'-' if slope_mid is None else f'{slope_mid / 1024:+.2f}'} "
                       f"| {'-' if slope_last is None else f'{slope_last / 1024:+.2f}'} | {verdict} |")
        out += ["", "Connections (steady: the middle third's median and max; end: idle, after every task ended):",
                "", "| connections | steady | steady max | last-third median | peak | end | leaked |",
                "|---|---|---|---|---|---|---|"]
        rows = ([(f"PostgreSQL `{name}`", c) for name, c in v["pg_connections"].items()]
                + [("PostgreSQL, all the daemon's", v["pg_connections_total"])]
                + [(f"libvirt {node} clients", c) for node, c in v["libvirt_connections"].items()])
        for name, c in rows:
            leaked = "-" if c["leaked"] is None else ("**yes**" if c["leaked"] else "no")
            out.append(f"| {name} | {_num(c['steady'])} | {_num(c['steady_max'])} | {_num(c['last_third_median'])} "
                       f"| {_num(c['peak'])} | {_num(c['end'])} | {leaked} |")
        if r.get("latency_over_time"):
            out += ["", "Latency over time (tasks by when they were queued; wait = queued to started, ready wait = "
                        "from when the task could start, its VM's previous task ended, to started; ms):", "",
                    "| queued from s | tasks | wait p50 | wait p99 | wait max | ready wait p50 | ready wait p99 "
                    "| ready wait max |", "|---|---|---|---|---|---|---|---|"]
            for b in r["latency_over_time"]:
                out.append(f"| {b['from_s']:.0f} | {b['tasks']:,} | {b['wait_p50_ms']:,.0f} | {b['wait_p99_ms']:,.0f} "
                           f"| {b['wait_max_ms']:,.0f} | {b['ready_wait_p50_ms']:,.0f} "
                           f"| {b['ready_wait_p99_ms']:,.0f} | {b['ready_wait_max_ms']:,.0f} |")
        if r.get("longest_ready_waits"):
            out += ["", "Longest waits after ready (overtaken by: tasks queued later that started earlier):", "",
                    "| task | VM | action | queued s | ready s | started s | waited s | overtaken by | instance |",
                    "|---|---|---|---|---|---|---|---|---|"]
            for w in r["longest_ready_waits"][:5]:
                out.append(f"| {w['id']} | {w['key_id']} | {w['action']} | {w['created_s']:.1f} | {w['ready_s']:.1f} "
                           f"| {w['started_s']:.1f} | {w['ready_wait_s']:.1f} | {w['overtaken_by']:,} "
                           f"| {w.get('claimed_by')} |")
        notes = [line for lines in r.get("log_notes", {}).values() for line in lines]
        if notes:
            out += ["", "Daemon log lines worth a look:", "", "```", *notes[:20], "```"]
        out.append("")
    out.append(f"Overall: {'every verdict ok' if results['ok'] else 'FAILED'}.")
    return "\n".join(out)


_INSTANCE_STYLES = ("-", "--", ":")


def _role_kind(role: str) -> str:
    bare = role.split(" ", 1)[1] if role.startswith("i") and role[1:2].isdigit() else role
    return "shards" if bare.startswith("shard") else bare


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    style.setup(matplotlib)
    import matplotlib.pyplot as plt

    written = []
    for r in results["runs"]:
        s = r.get("samples")
        if not s or not s["t"]:
            continue
        t = s["t"]
        end = r["verdicts"]["load_window_s"][1] if "verdicts" in r else t[-1]
        fig, ax = plt.subplots(figsize=(12, 6.5))
        labelled: set[str] = set()
        for role, values in s["rss_kb"].items():
            points = [(a, v / 1024) for a, v in zip(t, values, strict=True) if v is not None]
            # One colour per role (style.role_colour); instances by line style; one legend entry per role.
            kind = _role_kind(role)
            instance = role.split()[0] if role.startswith("i") and role[1:2].isdigit() else ""
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1, color=style.role_colour(role),
                    linestyle=_INSTANCE_STYLES[(int(instance[1:]) - 1) % 3 if instance else 0],
                    label=None if kind in labelled else kind)
            labelled.add(kind)
        for x in (end / 3, 2 * end / 3, end):
            ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("seconds since the first task was queued (dotted: thirds and end of the load window)")
        ax.set_ylabel("RSS, MiB")
        ax.set_title(f"soak {results['size']}, {r['label']}: RSS per daemon process")
        ax.legend(loc="lower right", title="solid/dashed/dotted: instance 1/2/3" if len(s["rss_kb"]) > 12 else None)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"rss-{r['setup']}.png"
        style.save(fig, path)
        written.append(path)

        fig, axes = plt.subplots(4, 1, figsize=(12, 12), sharex=True)
        for name, values in s["pg"].items():
            axes[0].plot(t, [v or 0 for v in values], label=name, linewidth=1)
        axes[0].plot(t, s["pg_total"], label="all the daemon's", color="black", linewidth=1.5)
        axes[0].set_ylabel("PostgreSQL connections")
        axes[0].legend(ncol=2, loc="upper right")
        for node, values in s["libvirt"].items():
            axes[1].plot(t, values, label=f"{node} clients", linewidth=1)
        axes[1].set_ylabel("libvirt connections")
        axes[1].legend()
        tasks = s["tasks"]
        axes[2].plot(t, [q + r_ for q, r_ in zip(tasks["queued"], tasks["running"], strict=True)],
                     label="unsettled (queued + running)")
        axes[2].plot(t, tasks["running"], label="running", linewidth=0.8)
        rate = [0.0] + [(tasks["ended"][i] - tasks["ended"][i - 1]) / (t[i] - t[i - 1]) if t[i] > t[i - 1] else 0.0
                        for i in range(1, len(t))]
        twin = axes[2].twinx()
        twin.plot(t, rate, color="grey", linewidth=0.6, label="ended per second (right)")
        twin.set_ylabel("ended / s")
        axes[2].set_ylabel("tasks")
        axes[2].legend(loc="upper left")
        twin.legend(loc="upper right")
        buckets = r.get("latency_over_time") or []
        if buckets:
            xs = [b["from_s"] for b in buckets]
            axes[3].step(xs, [b["wait_p99_ms"] / 1000 for b in buckets], where="post", label="wait p99")
            axes[3].step(xs, [b["wait_max_ms"] / 1000 for b in buckets], where="post", label="wait max",
                         linewidth=0.8)
            axes[3].step(xs, [b["ready_wait_p99_ms"] / 1000 for b in buckets], where="post",
                         label="wait after ready p99")
            axes[3].legend()
        axes[3].set_ylabel("s (by time queued)")
        axes[3].set_xlabel("seconds since the first task was queued")
        for ax in axes:
            ax.axvline(end, color="grey", linestyle=":", linewidth=0.8)
            ax.grid(alpha=0.3)
        axes[0].set_title(f"soak {results['size']}, {r['label']}: connections, backlog and latency")
        fig.tight_layout()
        path = out / f"connections-{r['setup']}.png"
        style.save(fig, path)
        written.append(path)
    return written


def write(results: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    path = out / "summary.md"
    path.write_text(summary(results) + "\n")
    written = [path]
    if plots:
        try:
            written += plot(results, out)
        except ImportError:
            print("matplotlib is not installed: no plots (pip install -e '.[bench]')", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m bench.soak_report <soak.json>", file=sys.stderr)
        return 2
    source = Path(args[0])
    results = json.loads(source.read_text())
    for path in write(results, source.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
