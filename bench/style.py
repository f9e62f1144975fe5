"""One look for every benchmark plot: a fixed colour and marker per system, readable sizes, plain log2 axes.

Every plotting function in ``bench/`` takes its colours from here, so "taskomatic 4 shards" or "SKIP LOCKED
pool" is the same colour in every PNG. A system is a family (taskomatic standalone, taskomatic multihost, the
SKIP LOCKED pool, the original design, hash or pinned routing); within a family the shade darkens with the
shard (or worker, or instance) count, and each count has its own marker.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

DPI = 100
MAX_WIDTH_PX = 1600
MAX_HEIGHT_PX = 1600
FONT_SIZE = 11
LEGEND_FONT_SIZE = 9

# family -> (base colour, light shade, dark shade, description used in legends)
FAMILIES: dict[str, tuple[str, str, str, str]] = {
    "taskomatic": ("#1f77b4", "#9ecae1", "#08306b", "taskomatic standalone (per-key order)"),
    "multihost": ("#2ca02c", "#a1d99b", "#00441b", "taskomatic multihost (partition leases)"),
    "pool": ("#ff7f0e", "#fdd0a2", "#7f2704", "SKIP LOCKED pool (no order)"),
    "original": ("#7f7f7f", "#7f7f7f", "#7f7f7f", "original design (1 process, poll loop)"),
    # The routings shade by shard count like the standalone family (pinned is the default: its colours).
    "hash": ("#9467bd", "#dadaeb", "#3f007d", "taskomatic, hash routing"),
    "pinned": ("#1f77b4", "#9ecae1", "#08306b", "taskomatic, pinned routing"),
}
# Markers by count (1, 2, 4, 8, 16, ...); the family colour says the system, the marker the size.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FAMILY_MARKER = {"taskomatic": "o", "multihost": "s", "pool": "^", "original": "x", "hash": "D", "pinned": "o"}

# Daemon process roles (memory plots); instance prefixes ("i2 shard 0") keep the role's colour.
ROLE_COLOURS = {"supervisor": "#d62728", "fetcher": "#9467bd", "shard": "#1f77b4", "reconciler": "#8c564b",
                "resource tracker": "#7f7f7f"}
TARGET_COLOUR = "#d62728"  # a target line (always dotted)
BOUND_COLOUR = "#2ca02c"   # a lower bound (always dotted)

_COUNT = re.compile(r"(\d+) (?:shards?|workers?|instances?)\b")


def family_of(label: str, runner: str | None = None) -> str:
    """The system family of a run label or runner name ("SKIP LOCKED pool 4 workers" -> "pool")."""
    text = f"{runner or ''} {label}".lower()
    for family, needle in (("multihost", "multihost"), ("pool", "pool"), ("original", "original"),
                           ("hash", "hash"), ("pinned", "pinn")):
        if needle in text:
            return family
    if "taskomatic" in text or "standalone" in text:
        return "taskomatic"
    raise ValueError(f"no system family for plot label {label!r} (runner {runner!r}): add it to bench/style.py")


def count_of(label: str) -> int | None:
    """The shard / worker / instance count a label names, if any."""
    found = _COUNT.search(label)
    if found:
        return int(found.group(1))
    lead = re.match(r"(\d+) multihost", label)
    return int(lead.group(1)) if lead else None


def _mix(light: str, dark: str, t: float) -> str:
    a = [int(light[i:i + 2], 16) for i in (1, 3, 5)]
    b = [int(dark[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b, strict=True))


def colour(label: str, runner: str | None = None, count: int | None = None) -> str:
    """The fixed colour of a system (and count): light for 1, darker for each doubling up to 16."""
    family = family_of(label, runner)
    base, light, dark, _ = FAMILIES[family]
    n = count if count is not None else count_of(label)
    if n is None or light == dark:
        return base
    return _mix(light, dark, min(1.0, math.log2(max(1, n)) / 4))


def marker(label: str, runner: str | None = None, count: int | None = None) -> str:
    family = family_of(label, runner)
    n = count if count is not None else count_of(label)
    if n is None or family in ("original", "hash", "pinned"):
        return FAMILY_MARKER[family]
    return MARKERS[min(len(MARKERS) - 1, int(math.log2(max(1, n))))]


def family_label(family: str) -> str:
    return FAMILIES[family][3]


def role_colour(role: str) -> str:
    """A daemon process role's colour ("i1 shard 3" -> the shard colour)."""
    bare = re.sub(r"^i\d+ ", "", role)
    kind = "shard" if bare.startswith("shard") else bare
    return ROLE_COLOURS.get(kind, "#17becf")


def setup(matplotlib: Any) -> None:
    """Readable defaults for every figure (call after importing matplotlib)."""
    matplotlib.use("Agg")
    matplotlib.rcParams.update({
        "font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE + 1, "axes.labelsize": FONT_SIZE,
        "xtick.labelsize": FONT_SIZE - 1, "ytick.labelsize": FONT_SIZE - 1, "legend.fontsize": LEGEND_FONT_SIZE,
        "figure.titlesize": FONT_SIZE + 3, "figure.dpi": DPI, "savefig.dpi": DPI, "axes.grid": True,
        "grid.alpha": 0.3})


def figsize(cols: float, rows: float, cell_w: float = 5.0, cell_h: float = 3.8) -> tuple[float, float]:
    """A grid's size in inches, shrunk so that it never exceeds MAX_WIDTH_PX x MAX_HEIGHT_PX at DPI."""
    width = min(cols * cell_w, MAX_WIDTH_PX / DPI)
    height = min(rows * cell_h, MAX_HEIGHT_PX / DPI)
    return width, height


def grid_shape(panels: int, max_cols: int = 3) -> tuple[int, int]:
    """(rows, cols) of a grid of subplots, never one long row."""
    cols = max(1, min(max_cols, panels))
    return -(-panels // cols), cols


def log2_axis(ax: Any, values: list[int] | list[float], axis: str = "x") -> None:
    """A log2 axis whose ticks are the values themselves written plainly (1, 2, 4, 8, 16; never 2^k)."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ticks = sorted({int(v) for v in values})
    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    target.set_major_locator(FixedLocator(ticks))
    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    target.set_major_formatter(formatter)
    target.set_minor_locator(NullLocator())
    if ticks:
        lo, hi = ticks[0], ticks[-1]
        (ax.set_xlim if axis == "x" else ax.set_ylim)(lo / 1.3, hi * 1.3)


def save(fig: Any, path: Path) -> Path:
    """Save at DPI after checking the size (a figure wider than MAX_WIDTH_PX is a bug in its code)."""
    import matplotlib.pyplot as plt

    width, height = fig.get_size_inches()
    if width * DPI > MAX_WIDTH_PX + 1 or height * DPI > MAX_HEIGHT_PX + 1:
        plt.close(fig)
        raise ValueError(f"{path.name}: {width * DPI:.0f}x{height * DPI:.0f} px is over "
                         f"{MAX_WIDTH_PX}x{MAX_HEIGHT_PX}; use a grid of subplots")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plain_log_axis(ax: Any, axis: str = "x") -> None:
    """A log10 axis labelled 1, 10, 100, 1000 (not 10^k)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    target.set_minor_formatter(NullFormatter())
