"""The benchmark's routing dimension: taskomatic runs once per ``--routing``, side by side (no runs here: the
suite's shape, the command line, and the report and plots of a results.json with and without routings)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from bench import report, run, style
from bench.runners import RunnerSpec

ROOT = Path(__file__).resolve().parents[2]
STORED = ROOT / "bench" / "RESULTS" / "results-2026-11-25.json.gz"  # the full suite from before the routing dimension
COMPARED = {"noop-uniform", "noop-zipf", "sleep20-uniform", "sleep20-zipf", "heavy-uniform", "heavy-zipf"}


def _routings(entries: list[run.Entry]) -> dict[tuple[str, int], list[str | None]]:
    out: dict[tuple[str, int], list[str | None]] = {}
    for entry in entries:
        for spec in entry.runners:
            if spec.kind == "taskomatic":
                out.setdefault((entry.workload.name, spec.parallelism), []).append(spec.routing)
    return out


def test_quick_compares_both_routings_on_the_throughput_and_makespan_workloads() -> None:
    routed = _routings(run.suite("quick"))
    assert {w for (w, _), r in routed.items() if r == ["pinned", "hash"]} == COMPARED
    assert {n for (w, n) in routed if w == "noop-uniform"} == {1, 2, 4}
    # The steady and lifecycle runs keep one routing: the default.
    assert all(r == ["pinned"] for (w, _), r in routed.items() if w not in COMPARED)
    full = _routings(run.suite("full"))
    assert {w for (w, _), r in full.items() if r == ["pinned", "hash"]} == COMPARED


def test_smoke_runs_one_routing_and_routing_picks_which() -> None:
    assert all(r == ["pinned"] for r in _routings(run.suite("smoke")).values())
    assert all(r == ["hash"] for r in _routings(run.suite("quick", ("hash",))).values())


def test_a_run_is_labelled_with_its_routing() -> None:
    assert RunnerSpec("taskomatic", 4, "hash").label == "taskomatic 4 shards, hash routing"
    assert RunnerSpec("taskomatic", 1).label == "taskomatic 1 shard"  # results from before the dimension
    assert style.family_of(RunnerSpec("taskomatic", 4, "hash").label, "taskomatic") == "hash"
    assert style.family_of(RunnerSpec("taskomatic", 4, "pinned").label, "taskomatic") == "pinned"
    with pytest.raises(ValueError, match="routing"):
        RunnerSpec("pool", 4, "hash")
    with pytest.raises(ValueError, match="routing"):
        RunnerSpec("taskomatic", 4, "random")


def test_routing_through_set_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--smoke", "--set", "routing=hash"])
    assert exit_info.value.code == 2
    assert "use --routing" in capsys.readouterr().err


def _with_routings(results: dict[str, Any]) -> dict[str, Any]:
    """The stored results as if each taskomatic run had been a pinned one, with a hash twin at 0.8x throughput
    (and 1.5x the makespan) but for the lifecycle runs."""
    out = copy.deepcopy(results)
    runs = []
    for r in out["runs"]:
        runs.append(r)
        if r["runner"] == "taskomatic":  # every daemon run names its routing; lifecycle runs one only
            r["routing"] = "pinned"
            r["label"] = RunnerSpec("taskomatic", r["parallelism"], "pinned").label
        if r["runner"] == "taskomatic" and "lifecycle" not in r:
            twin = copy.deepcopy(r)
            twin["routing"] = "hash"
            twin["label"] = RunnerSpec("taskomatic", r["parallelism"], "hash").label
            twin["throughput_tps"] = r["throughput_tps"] * 0.8
            if r.get("makespan_ratio"):
                twin["makespan_ratio"] = r["makespan_ratio"] * 1.5
            runs.append(twin)
    out["runs"] = runs
    return out


def test_old_results_render_without_a_routing_section() -> None:
    stored = report.load(STORED)
    assert not any("routing" in r for r in stored["runs"])
    text = report.markdown(stored, [])
    assert "## Routing: hash vs pinned" not in text and "## Scaling over shards: noop-uniform" in text


def test_the_report_puts_the_routings_side_by_side() -> None:
    results = _with_routings(report.load(STORED))
    pairs = report.routing_pairs(results)
    assert pairs and all(p["routing"] == "pinned" and h["routing"] == "hash" for p, h in pairs)
    text = report.markdown(results, [])
    section = text.split("## Routing: hash vs pinned", 1)[1].split("\n## ", 1)[0]
    pinned, hashed = next((p, h) for p, h in pairs if p["workload"] == "noop-uniform" and p["parallelism"] == 4)
    row = next(line for line in section.splitlines() if line.startswith("| noop-uniform | 4 |"))
    assert f"| {pinned['throughput_tps']:,.0f} | {hashed['throughput_tps']:,.0f} | 0.80 |" in row
    sleep_row = next(line for line in section.splitlines() if line.startswith("| sleep20-uniform |"))
    assert "| 1.50 |" in sleep_row  # hash / pinned makespan
    # The scaling table keeps the pinned (default) run.
    scaling = text.split("## Scaling over shards: noop-uniform", 1)[1].split("\n## ", 1)[0]
    assert f"| 4 | {pinned['throughput_tps']:,.0f} |" in scaling


def test_the_throughput_plot_draws_one_line_per_routing_in_its_colour(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.colors import to_hex

    from bench import report_plots

    kept: dict[str, Any] = {}
    monkeypatch.setattr(style, "save", lambda fig, path: kept.setdefault(path.name, fig) and path)
    report_plots.throughput_figure(_with_routings(report.load(STORED)), tmp_path / "t.png")
    lines = [(line.get_label(), to_hex(line.get_color())) for ax in kept["t.png"].axes for line in ax.get_lines()
             if not line.get_label().startswith("_")]
    expected = {style.family_label(f): to_hex(style.colour(f, f)) for f in ("pinned", "hash", "pool", "original")}
    assert {label for label, _ in lines} == set(expected)
    assert all(colour == expected[label] for label, colour in lines)
    assert expected[style.family_label("pinned")] != expected[style.family_label("hash")]


def test_taskomatic_bench_passes_routing_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import argparse
    import types

    from taskomatic.capacity import cli

    seen: list[list[str]] = []
    monkeypatch.setattr(run, "main", lambda argv, prog: seen.append(argv) or 0)
    args = argparse.Namespace(suite="quick", seed=1, only=None, out=tmp_path, no_plots=True, no_progress=True,
                              keep_work_dir=False, bench_routing="hash")
    assert cli.cmd_bench(types.SimpleNamespace(log_level="debug"), args) == 0  # type: ignore[arg-type]
    assert seen[0][-2:] == ["--routing", "hash"]
