"""Every bench plot takes its colours from bench/style.py, fits in 1600 px, and labels log2 axes plainly.

The plots are drawn from the results stored in bench/RESULTS/ and bench/results/ (what the PNGs show), with
``style.save`` wrapped to keep each figure for inspection.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench import style

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.colors import to_hex  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "RESULTS"
SOAK = ROOT / "bench" / "results" / "soak-2026-11-25" / "soak.json"


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """name -> figure of every plot saved while the test runs (drawn, so tick labels have their text)."""
    kept: dict[str, Any] = {}
    real_save = style.save

    def keep(fig: Any, path: Path) -> Path:
        fig.canvas.draw()
        kept[path.name] = fig
        import matplotlib.pyplot as plt

        monkeypatch.setattr(plt, "close", lambda *_: None)  # keep it open for the assertions
        return real_save(fig, path)

    monkeypatch.setattr(style, "save", keep)
    return kept


def _suite() -> dict[str, Any]:
    from bench.report import load

    return load(RESULTS / "results.json.gz")


def _labelled_lines(fig: Any) -> list[tuple[str, str]]:
    return [(line.get_label(), to_hex(line.get_color())) for ax in fig.axes for line in ax.get_lines()
            if not line.get_label().startswith("_")]


def _assert_size(fig: Any) -> None:
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= style.MAX_WIDTH_PX + 1 and height <= style.MAX_HEIGHT_PX + 1, (width, height)


def test_the_run_plots_use_one_colour_per_system(tmp_path: Path, figures: dict[str, Any]) -> None:
    from bench.report_plots import PLOTS, plot

    suite = _suite()
    plot(suite, tmp_path)
    assert set(PLOTS) <= set(figures)
    for fig in figures.values():
        _assert_size(fig)

    lines = _labelled_lines(figures["throughput_vs_shards.png"])
    # A suite run with both routings draws each as its own system (a line per routing).
    routed = any("routing" in r for r in suite["runs"])
    families = {style.family_label(f): f for f in (*(("pinned", "hash") if routed else ("taskomatic",)),
                                                    "pool", "original")}
    assert {label for label, _ in lines} == set(families)
    for label, colour in lines:
        assert colour == to_hex(style.colour(families[label], families[label]))

    cdf = _labelled_lines(figures["latency_cdf.png"])
    assert len({label for label, _ in cdf}) >= 5
    for label, colour in cdf:
        assert colour == to_hex(style.colour(label)), label
    # The same run label is the same colour in every panel; different systems differ.
    assert len({c for _, c in cdf}) == len({label for label, _ in cdf})

    bars_checked = 0
    for ax in figures["makespan_ratio.png"].axes:
        if not ax.get_visible():
            continue
        names = [t.get_text() for t in ax.get_yticklabels()]
        colours = [to_hex(p.get_facecolor()) for p in ax.patches]
        assert len(names) == len(colours) > 0
        for name, colour in zip(names, colours, strict=True):
            assert colour == to_hex(style.colour(name)), name
            bars_checked += 1
    assert bars_checked >= 10


def test_log2_axes_read_as_plain_integers(tmp_path: Path, figures: dict[str, Any]) -> None:
    from bench.report_plots import plot

    plot(_suite(), tmp_path)
    seen = set()
    for ax in figures["throughput_vs_shards.png"].axes:
        if not ax.get_visible():
            continue
        assert ax.get_xscale() == "log"
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all(re.fullmatch(r"\d+", text) for text in labels), labels
        seen.update(labels)
    assert {"1", "2", "4", "8", "16"} <= seen
    for ax in figures["latency_cdf.png"].axes:
        if ax.get_visible():
            assert not any("^" in t.get_text() for t in ax.get_xticklabels()), "10^k tick labels"


def test_the_multihost_bounded_and_soak_plots_use_the_shared_colours(tmp_path: Path,
                                                                     figures: dict[str, Any]) -> None:
    from bench.bounded_report import plot as plot_bounded
    from bench.multihost.output import plot_scaling
    from bench.soak_report import plot as plot_soak

    multihost = json.loads((RESULTS / "multihost.json").read_text())
    plot_scaling(multihost, tmp_path / "multihost.png")
    rows = [s for s in multihost["scaling"]["summary"] if s.get("throughput_tps")]
    left = figures["multihost.png"].axes[0]
    # One bar per setup and routing, in the routing's colour (results from before the routing dimension:
    # the multihost family's), the routings side by side in the same order in every panel.
    routings = [r for r in ("pinned", "hash") if any(s.get("routing") == r for s in rows)] or [None]
    setups = {(s["mode"], s.get("instances", s["setup"])) for s in rows}
    assert [to_hex(p.get_facecolor()) for p in left.patches] == [
        to_hex(style.colour(r or "multihost", r or "multihost")) for r in routings for _ in setups]

    plot_bounded(json.loads((RESULTS / "bounded.json").read_text()), tmp_path / "bounded.png")
    memory_lines = [(label, colour) for label, colour in _labelled_lines(figures["bounded.png"])
                    if label.endswith(" RSS")]
    assert memory_lines
    for label, colour in memory_lines:
        role = label.removesuffix(" RSS").removesuffix("s")  # "shards RSS" -> "shard"
        assert colour == to_hex(style.role_colour(role)), label

    plot_soak(json.loads(SOAK.read_text()), tmp_path)
    rss = [name for name in figures if name.startswith("rss-")]
    assert rss
    for name in rss:
        for label, colour in _labelled_lines(figures[name]):
            assert colour == to_hex(style.role_colour(label.removesuffix("s"))), label
    for fig in figures.values():
        _assert_size(fig)


def test_style_gives_each_system_one_colour() -> None:
    assert style.colour("taskomatic 4 shards") == style.colour("x", "taskomatic", 4)
    assert style.colour("SKIP LOCKED pool 4 workers") != style.colour("taskomatic 4 shards")
    assert style.colour("taskomatic 1 shard") != style.colour("taskomatic 16 shards")
    assert style.colour("2 multihost", "multihost") != style.colour("taskomatic 2 shards")
    assert style.role_colour("i2 shard 1") == style.role_colour("shard 0")
    with pytest.raises(ValueError, match="no system family"):
        style.family_of("mystery runner")


def test_a_figure_wider_than_the_limit_is_refused(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(style.MAX_WIDTH_PX / style.DPI + 2, 3))
    with pytest.raises(ValueError, match="grid of subplots"):
        style.save(fig, tmp_path / "wide.png")
    assert not (tmp_path / "wide.png").exists()
