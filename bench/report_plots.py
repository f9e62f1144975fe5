"""The PNGs of a ``bench.run`` results.json (matplotlib, optional), and which runs they show.

``bench/report.py`` writes them beside report.md; the Markdown names the same runs
(:func:`timeline_runs`, :func:`scaling_workloads`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import style

PLOTS = ("throughput_vs_shards.png", "latency_cdf.png", "makespan_ratio.png", "utilisation_timeline.png",
         "utilisation_timeline_lifecycle.png")
# The representative run of the timeline plot: the first of these workloads that has
# one, preferring 4 shards (the quick suite's default), else the run with the most.
TIMELINE_PREFERENCE = ("heavy-zipf", "heavy-uniform", "sleep20-zipf", "lifecycle-zipf", "sleep20-uniform",
                       "lifecycle-uniform")
TIMELINE_SHARDS = 4
_BUSY = style.colour("taskomatic", "taskomatic")  # shards are taskomatic: its colour


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



def _sorted_labels(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per label, in legend order: taskomatic, pool, original; by count within each."""
    order = {"taskomatic": 0, "pinned": 0, "hash": 1, "multihost": 2, "pool": 3, "original": 4}
    seen: dict[str, dict[str, Any]] = {}
    for r in runs:
        seen.setdefault(r["label"], r)
    return sorted(seen.values(), key=lambda r: (order.get(style.family_of(r["label"], r["runner"]), 9),
                                                r["parallelism"]))


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """The PNGs; [] when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return []
    style.setup(matplotlib)
    written = [throughput_figure(results, out / PLOTS[0]), latency_figure(results, out / PLOTS[1])]
    makespan = makespan_figure(results, out / PLOTS[2])
    if makespan:
        written.append(makespan)
    for name, run in timeline_runs(results):
        written.append(style.save(timeline_figure(run), out / name))
    return written


def _throughput_series(runs: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """(family, runner, routing) of each line: taskomatic once per routing run (results before the routing
    dimension have none: the standalone family), then the pool."""
    routings = sorted({r.get("routing") for r in runs if r["runner"] == "taskomatic"},
                      key=lambda v: ("", "pinned", "hash").index(v or ""))
    return [*((routing or "taskomatic", "taskomatic", routing) for routing in routings), ("pool", "pool", None)]


def throughput_figure(results: dict[str, Any], path: Path) -> Path:
    """Tasks/s against shards (workers) per workload: taskomatic, the pool and the original design."""
    import matplotlib.pyplot as plt

    runs = results["runs"]
    scaling = scaling_workloads(results) or [w["name"] for w in results["workloads"]][:1]
    rows, cols = style.grid_shape(len(scaling))
    # At least two panels wide: one panel (the quick suite) would cut the title and the legend.
    fig, axes = plt.subplots(rows, cols, figsize=style.figsize(max(cols, 2), rows, 5.2, 3.9 + 0.4), squeeze=False)
    for extra in axes.flat[len(scaling):]:
        extra.set_visible(False)
    for ax, workload in zip(axes.flat, scaling, strict=False):
        mine = [r for r in runs if r["workload"] == workload]
        counts: set[int] = set()
        for family, runner, routing in _throughput_series(mine):
            pts = sorted((r["parallelism"], r["throughput_tps"]) for r in mine
                         if r["runner"] == runner and r.get("routing") == routing and r.get("throughput_tps"))
            if pts:
                counts.update(p[0] for p in pts)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="-",
                        marker=style.FAMILY_MARKER[family], color=style.colour(family, family, None),
                        label=style.family_label(family))
        original = next((r for r in mine if r["runner"] == "original" and r.get("throughput_tps")), None)
        if original:
            ax.axhline(original["throughput_tps"], color=style.colour("original", "original"), linestyle="--",
                       label=style.family_label("original"))
        style.log2_axis(ax, sorted(counts) or [1])
        ax.set_xlabel("shards (taskomatic) / workers (pool)")
        ax.set_ylabel("tasks/s")
        ax.set_ylim(bottom=0, top=1.15 * max([1.0, *(r.get("throughput_tps") or 0 for r in mine)]))
        ax.set_title(workload)
    _shared_legend(fig, axes)
    fig.suptitle("Throughput vs parallelism: taskomatic vs SKIP LOCKED pool vs original design")
    fig.tight_layout(rect=(0, 0.1 if rows == 1 else 0.05, 1, 1))
    return style.save(fig, path)


def latency_figure(results: dict[str, Any], path: Path) -> Path:
    """Enqueue-to-start CDF per workload, one line per run, one shared legend."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = results["runs"]
    names = [w["name"] for w in results["workloads"]
             if any(r.get("latency_cdf_ms") for r in runs if r["workload"] == w["name"])]
    rows, cols = style.grid_shape(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=style.figsize(cols, rows + 0.4, 5.2, 3.4), squeeze=False)
    for ax, workload in zip(axes.flat, names, strict=False):
        for r in runs:
            if r["workload"] != workload or not r.get("latency_cdf_ms"):
                continue
            xs = [max(p[0], 1e-3) for p in r["latency_cdf_ms"]]
            ys = [p[1] for p in r["latency_cdf_ms"]]
            ax.plot(xs, ys, "-" if r["runner"] == "taskomatic" else "--", label=r["label"], linewidth=1.5,
                    color=style.colour(r["label"], r["runner"], r["parallelism"]))
        style.plain_log_axis(ax)
        ax.set_xlabel("enqueue -> start, ms (log scale)")
        ax.set_ylabel("fraction of tasks")
        ax.set_title(workload)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    shown = _sorted_labels([r for r in runs if r.get("latency_cdf_ms")])
    handles = [Line2D([], [], color=style.colour(r["label"], r["runner"], r["parallelism"]), linewidth=2,
                      linestyle="-" if r["runner"] == "taskomatic" else "--") for r in shown]
    fig.legend(handles, [r["label"] for r in shown], loc="lower center", ncol=min(6, len(shown)))
    fig.suptitle("Enqueue-to-start latency CDF: taskomatic (solid) vs baselines (dashed)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return style.save(fig, path)


def _shared_legend(fig: Any, axes: Any) -> None:
    """One legend under the grid with every label any panel drew (panels stay uncluttered)."""
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)))


def makespan_figure(results: dict[str, Any], path: Path) -> Path | None:
    """Makespan / lower bound per workload with work: one panel each, one bar per run."""
    import matplotlib.pyplot as plt

    runs = results["runs"]
    with_work = [w["name"] for w in results["workloads"]
                 if any(r.get("makespan_ratio") for r in runs if r["workload"] == w["name"])]
    if not with_work:
        return None
    rows, cols = style.grid_shape(len(with_work))
    fig, axes = plt.subplots(rows, cols, figsize=style.figsize(cols, rows, 5.2, 3.6), squeeze=False)
    for ax, workload in zip(axes.flat, with_work, strict=False):
        mine = _sorted_labels([r for r in runs if r["workload"] == workload and r.get("makespan_ratio")])
        ys = list(range(len(mine)))
        ax.barh(ys, [r["makespan_ratio"] for r in mine],
                color=[style.colour(r["label"], r["runner"], r["parallelism"]) for r in mine])
        for y, r in zip(ys, mine, strict=True):
            ax.text(r["makespan_ratio"], y, f" {r['makespan_ratio']:.2f}", va="center", fontsize=9)
        ax.set_yticks(ys)
        ax.set_yticklabels([r["label"].replace("SKIP LOCKED ", "").replace(" (1 process, poll loop)", "")
                            for r in mine])
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(1.10, color=style.TARGET_COLOUR, linewidth=1, linestyle=":", label="target 1.10")
        top = max(r["makespan_ratio"] for r in mine)
        ax.set_xlim(0, max(1.3, top * 1.18))
        ax.set_xlabel("makespan / lower bound (1 = perfect)")
        ax.set_title(workload)
        ax.grid(True, axis="y", alpha=0)
    for ax in list(axes.flat)[len(with_work):]:
        ax.set_visible(False)
    _shared_legend(fig, axes)
    fig.suptitle("Makespan against its lower bound: taskomatic vs SKIP LOCKED pool vs original design "
                 "(bar colour = system)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return style.save(fig, path)


def timeline_figure(run: dict[str, Any]) -> Any:
    """Per-shard busy intervals (one row each) above the tasks running and waiting over time."""
    import matplotlib.pyplot as plt

    tl = run["timeline"]
    shards = tl["shards"]
    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(10, 3.4 + 0.32 * shards + 2.2),
        gridspec_kw={"height_ratios": [max(1.5, 0.32 * shards), 2.0]})
    for i in range(shards):
        bars = [(s, e - s) for s, e in tl["busy"][i]]
        if bars:
            top.broken_barh(bars, (i - 0.4, 0.8), facecolors=_BUSY, linewidth=0)
    top.set_yticks(range(shards))
    top.set_yticklabels([f"shard {i} ({tl['tasks_per_shard'][i]})" for i in range(shards)], fontsize=9)
    top.set_ylim(shards - 0.5, -0.5)
    for ax in (top, bottom):
        if run.get("lower_bound_s"):
            ax.axvline(run["lower_bound_s"], color=style.BOUND_COLOUR, linestyle=":", linewidth=1)
        ax.axvline(tl["end_s"], color="black", linestyle="--", linewidth=0.8)
        ax.grid(True, axis="x", alpha=0.3)
    source = "tasks.run_by_shard" if tl.get("attributed_by", "").startswith("tasks.") else "router.shard_for"
    top.set_title(f"{run['workload']} / {run['label']}: busy time per shard (tasks in brackets; attributed by "
                  f"{source}{'' if tl['consistent'] else ', INCONSISTENT'})", fontsize=11)
    running = tl["running"]
    label = "running" + (f" (mean per {tl['running_bin_s'] * 1000:.0f} ms)" if tl.get("running_bin_s") else "")
    if running:
        bottom.step([p[0] for p in running], [p[1] for p in running], where="post", color=_BUSY,
                    linewidth=0.6, alpha=0.45, label=label)
        if not tl.get("running_bin_s") and tl["end_s"] > 0:
            # Short tasks make the exact curve a comb: a time-weighted mean over 1/100 of the run reads better.
            from bench.measure import bin_curve

            bins = 100
            mean = bin_curve(running, tl["end_s"], bins)
            bottom.step([p[0] for p in mean] + [tl["end_s"]], [p[1] for p in mean] + [mean[-1][1]], where="post",
                        color=_BUSY, linewidth=1.8,
                        label=f"running, mean per {tl['end_s'] / bins * 1000:.0f} ms")
    bottom.axhline(shards, color=_BUSY, linestyle=":", linewidth=0.8, label=f"shards ({shards})")
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
        handles += [Line2D([], [], color=style.BOUND_COLOUR, linestyle=":", linewidth=1)]
        labels += [f"lower bound {run['lower_bound_s']:.2f} s"]
    # Under the axes, not over the curves.
    bottom.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    fig.tight_layout()
    return fig
