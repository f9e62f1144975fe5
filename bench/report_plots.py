"""The PNGs of a ``bench.run`` results.json (matplotlib, optional), and which runs they show.

``bench/report.py`` writes them beside report.md; the Markdown names the same runs
(:func:`timeline_runs`, :func:`scaling_workloads`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = ("throughput_vs_shards.png", "latency_cdf.png", "makespan_ratio.png", "utilisation_timeline.png",
         "utilisation_timeline_lifecycle.png")
# The representative run of the timeline plot: the first of these workloads that has
# one, preferring 4 shards (the quick suite's default), else the run with the most.
TIMELINE_PREFERENCE = ("heavy-zipf", "heavy-uniform", "sleep20-zipf", "lifecycle-zipf", "sleep20-uniform",
                       "lifecycle-uniform")
TIMELINE_SHARDS = 4


def scaling_workloads(results: dict[str, Any]) -> list[str]:
    """The workloads run through taskomatic at more than one shard count (the scaling plot's)."""
    found = []
    for w in results["workloads"]:
        shards = {r["parallelism"] for r in results["runs"] if r["workload"] == w["name"]
                  and r["runner"] == "taskomatic"}
        if len(shards) > 1:
            found.append(w["name"])
    return found


def timeline_runs(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(plot file, run) for the timeline plots: the representative run, and a lifecycle run if it is not one."""
    with_timeline = [r for r in results["runs"] if r.get("timeline")]
    if not with_timeline:
        return []

    def pick(candidates: list[dict[str, Any]]) -> dict[str, Any]:
        preferred = [r for r in candidates if r["parallelism"] == TIMELINE_SHARDS]
        return preferred[0] if preferred else max(candidates, key=lambda r: r["parallelism"])

    chosen = None
    for workload in TIMELINE_PREFERENCE:
        candidates = [r for r in with_timeline if r["workload"] == workload]
        if candidates:
            chosen = pick(candidates)
            break
    if chosen is None:
        chosen = pick([r for r in with_timeline if r["workload"] == with_timeline[0]["workload"]])
    out = [(PLOTS[3], chosen)]
    if "lifecycle" not in chosen:
        for workload in ("lifecycle-zipf", "lifecycle-uniform"):
            candidates = [r for r in with_timeline if r["workload"] == workload]
            if candidates:
                out.append((PLOTS[4], pick(candidates)))
                break
    return out



_COLOURS = {"taskomatic": "tab:blue", "pool": "tab:orange", "original": "tab:grey"}


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """The PNGs; [] when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = results["runs"]
    scaling = scaling_workloads(results) or [w["name"] for w in results["workloads"]][:1]
    cols = min(4, len(scaling))  # a grid, not one long row: readable at any width
    rows = -(-len(scaling) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    for extra in axes.flat[len(scaling):]:
        extra.set_visible(False)
    for ax, workload in zip(axes.flat, scaling, strict=False):
        mine = [r for r in runs if r["workload"] == workload]
        for kind, label in (("taskomatic", "taskomatic (per-key order)"), ("pool", "SKIP LOCKED pool (no order)")):
            pts = sorted((r["parallelism"], r["throughput_tps"]) for r in mine
                         if r["runner"] == kind and r.get("throughput_tps"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=_COLOURS[kind], label=label)
        original = next((r for r in mine if r["runner"] == "original" and r.get("throughput_tps")), None)
        if original:
            ax.axhline(original["throughput_tps"], color=_COLOURS["original"], linestyle="--",
                       label="original design (1 process, poll loop)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shards / workers")
        ax.set_ylabel("tasks/s")
        ax.set_ylim(bottom=0, top=1.12 * max([ax.get_ylim()[1], *(r.get("throughput_tps") or 0 for r in mine)]))
        ax.set_title(f"Throughput vs shards: {workload}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / PLOTS[0]))

    names = [w["name"] for w in results["workloads"]]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, workload in zip(axes.flat, names, strict=False):
        for r in runs:
            if r["workload"] != workload or not r.get("latency_cdf_ms"):
                continue
            xs = [max(p[0], 1e-3) for p in r["latency_cdf_ms"]]
            ys = [p[1] for p in r["latency_cdf_ms"]]
            style = "-" if r["runner"] == "taskomatic" else "--"
            ax.plot(xs, ys, style, label=r["label"], linewidth=1.3,
                    color=None if r["runner"] == "taskomatic" else _COLOURS[r["runner"]])
        ax.set_xscale("log")
        ax.set_xlabel("enqueue -> start, ms (log)")
        ax.set_ylabel("fraction of tasks")
        ax.set_title(workload)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle("Enqueue-to-start latency CDF")
    fig.tight_layout()
    written.append(_save(fig, out / PLOTS[1]))

    with_work = [w["name"] for w in results["workloads"]
                 if any(r.get("makespan_ratio") for r in runs if r["workload"] == w["name"])]
    if with_work:
        labels = sorted({r["label"] for r in runs if r.get("makespan_ratio")},
                        key=lambda s: (not s.startswith("taskomatic"), s))
        fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(with_work) * max(1, len(labels)) / 2), 4.4))
        width = 0.8 / max(1, len(labels))
        for i, label in enumerate(labels):
            values = []
            for workload in with_work:
                r = next((r for r in runs if r["workload"] == workload and r["label"] == label), None)
                values.append(r.get("makespan_ratio") if r else None)
            xs = [j + i * width for j in range(len(with_work))]
            ax.bar([x for x, v in zip(xs, values, strict=True) if v],
                   [v for v in values if v], width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.10, color="red", linewidth=0.8, linestyle=":", label="target 1.10x (issue 5)")
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(with_work))])
        ax.set_xticklabels(with_work)
        ax.set_ylabel("makespan / lower bound")
        ax.set_title("Makespan against its lower bound (burst workloads with work)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / PLOTS[2]))
    for name, run in timeline_runs(results):
        written.append(_save(timeline_figure(run), out / name))
    return written


def timeline_figure(run: dict[str, Any]) -> Any:
    """Per-shard busy intervals (one row each) above the tasks running and waiting over time."""
    import matplotlib.pyplot as plt

    tl = run["timeline"]
    shards = tl["shards"]
    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(10, 2.6 + 0.32 * shards + 2.2),
        gridspec_kw={"height_ratios": [max(1.5, 0.32 * shards), 2.0]})
    for i in range(shards):
        bars = [(s, e - s) for s, e in tl["busy"][i]]
        if bars:
            top.broken_barh(bars, (i - 0.4, 0.8), facecolors="tab:blue", linewidth=0)
    top.set_yticks(range(shards))
    top.set_yticklabels([f"shard {i} ({tl['tasks_per_shard'][i]})" for i in range(shards)], fontsize=8)
    top.set_ylim(shards - 0.5, -0.5)
    for ax in (top, bottom):
        if run.get("lower_bound_s"):
            ax.axvline(run["lower_bound_s"], color="green", linestyle=":", linewidth=1)
        ax.axvline(tl["end_s"], color="black", linestyle="--", linewidth=0.8)
        ax.grid(True, axis="x", alpha=0.3)
    source = "tasks.run_by_shard" if tl.get("attributed_by", "").startswith("tasks.") else "router.shard_for"
    top.set_title(f"{run['workload']} / {run['label']}: busy time per shard (tasks in brackets; attributed by "
                  f"{source}{'' if tl['consistent'] else ', INCONSISTENT'})", fontsize=10)
    running = tl["running"]
    label = "running" + (f" (mean per {tl['running_bin_s'] * 1000:.0f} ms)" if tl.get("running_bin_s") else "")
    if running:
        bottom.step([p[0] for p in running], [p[1] for p in running], where="post", color="tab:blue",
                    linewidth=0.6, alpha=0.45, label=label)
        if not tl.get("running_bin_s") and tl["end_s"] > 0:
            # Short tasks make the exact curve a comb: a time-weighted mean over 1/100 of the run reads better.
            from bench.measure import bin_curve

            bins = 100
            mean = bin_curve(running, tl["end_s"], bins)
            bottom.step([p[0] for p in mean] + [tl["end_s"]], [p[1] for p in mean] + [mean[-1][1]], where="post",
                        color="tab:blue", linewidth=1.8,
                        label=f"running, mean per {tl['end_s'] / bins * 1000:.0f} ms")
    bottom.axhline(shards, color="tab:blue", linestyle=":", linewidth=0.8, label=f"shards ({shards})")
    bottom.set_ylabel("tasks running")
    bottom.set_ylim(0, shards * 1.15 + 0.5)
    bottom.set_xlabel("seconds since the first task was queued")
    waiting = tl.get("waiting") or []
    handles, labels = bottom.get_legend_handles_labels()
    if waiting:
        twin = bottom.twinx()
        wlabel = "waiting (right axis)" + (f", mean per {tl['waiting_bin_s'] * 1000:.0f} ms"
                                           if tl.get("waiting_bin_s") else "")
        twin.step([p[0] for p in waiting], [p[1] for p in waiting], where="post", color="tab:grey",
                  linestyle="--", linewidth=1, label=wlabel)
        twin.set_ylabel("tasks waiting")
        twin.set_ylim(bottom=0)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], color="black", linestyle="--", linewidth=0.8)]
    labels += [f"makespan {tl['end_s']:.2f} s"]
    if run.get("lower_bound_s"):
        handles += [Line2D([], [], color="green", linestyle=":", linewidth=1)]
        labels += [f"lower bound {run['lower_bound_s']:.2f} s"]
    bottom.legend(handles, labels, fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


