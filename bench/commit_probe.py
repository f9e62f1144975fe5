"""What one commit costs while a run is under way: the unit of a hot key's chain bound.

A key's tasks form a chain: each may start only once its predecessor's outcome is
written, and the daemon writes that outcome and the successor's start in one
commit. So the hottest key's tasks take at least ``links x one commit`` however
many shards run, and a workload with a hot key (Zipf) cannot finish sooner.

The probe measures that unit in the same run, on the same database and under the
same load: a thread with its own autocommit connection updates one row of its own
table every ``interval`` seconds and times each round trip (statement and commit).
It adds about 1/interval commits per second, a few percent of a burst's.
"""

from __future__ import annotations

import itertools
import math
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import psycopg2

PROBE_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS bench_commit_probe (id integer PRIMARY KEY, n bigint NOT NULL);
INSERT INTO bench_commit_probe VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
"""
PROBE_SQL = "UPDATE bench_commit_probe SET n = n + 1 WHERE id = 1"


class CommitProbe:
    """Time single-row autocommit updates every ``interval`` s between ``start()`` and ``stop()``, or
    for the body of a ``with`` block (then ``figures`` holds what ``stop()`` returns)."""

    def __init__(self, dsn: str, interval: float = 0.01) -> None:
        self.interval = interval
        self.conn = psycopg2.connect(dsn, application_name="bench commit probe")
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute(PROBE_TABLE_SQL)
        self.samples: list[float] = []
        self.moments: list[float] = []  # when each sample began (time.time(), the clock of the task rows)
        self.figures: dict[str, Any] = summarise([])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-probe", daemon=True)

    def start(self) -> CommitProbe:
        self._thread.start()
        return self

    def __enter__(self) -> CommitProbe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        with self.conn.cursor() as cur:
            while not self._stop.is_set():
                moment, began = time.time(), time.perf_counter()
                cur.execute(PROBE_SQL)
                self.samples.append(time.perf_counter() - began)
                self.moments.append(moment)
                self._stop.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        """Stop the probe; its figures: samples, p50 and p90 in ms (None without samples)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.conn.close()
        self.figures = summarise(self.samples)
        return self.figures

    def timed(self) -> list[tuple[float, float]]:
        """(when it began, seconds) of each commit timed."""
        return list(zip(self.moments, self.samples, strict=True))


def summarise(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"samples": 0, "p50_ms": None, "p90_ms": None}
    ordered = sorted(samples)
    return {"samples": len(ordered), "p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p90_ms": round(ordered[math.ceil(len(ordered) * 0.9) - 1] * 1000, 3)}  # nearest rank


def chain_bound(links: int, commit_p50_ms: float | None, tasks: int, span_s: float | None) -> dict[str, Any]:
    """The hottest key's chain bound: ``links`` commits in a row. As a throughput (tasks over that time)
    and as the share of it the run reached (the chain's time over the run's span; 1.0: the run took no
    longer than its hottest key's commits)."""
    if not links or not commit_p50_ms or not span_s:
        return {"chain_s": None, "bound_tps": None, "share_of_bound": None}
    chain_s = links * commit_p50_ms / 1000
    return {"chain_s": round(chain_s, 4), "bound_tps": round(tasks / chain_s, 1),
            "share_of_bound": round(chain_s / span_s, 4)}


def chain_links(ran: Sequence[dict[str, Any]], commits: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
    """Where the hottest key's chain loses time: its links (one task's start to its successor's, in
    ms), split at the moment the last task of every other key ended. Before it, the chain shares the
    machine with the other keys' work; after it, it runs alone. The probe's ``commits`` ((when,
    seconds), ``CommitProbe.timed``) are split at the same moment, so each part's links can be set
    beside a bare commit under the same load. ``ran``: task rows with key_id, started and ended
    (epoch seconds, as ``bench.measure.task_rows`` gives them)."""
    if not ran:
        return {"key_id": None}
    hottest, _ = Counter(r["key_id"] for r in ran).most_common(1)[0]
    chain = sorted((r for r in ran if r["key_id"] == hottest), key=lambda r: r["started"])
    others_end = max((r["ended"] for r in ran if r["key_id"] != hottest), default=None)
    shared: list[float] = []
    alone: list[float] = []
    for before, after in itertools.pairwise(chain):
        link_ms = (after["started"] - before["started"]) * 1000.0
        (shared if others_end is not None and after["started"] < others_end else alone).append(link_ms)
    first = min(r["started"] for r in ran)
    last = max(r["ended"] for r in ran)
    during = [(when, seconds) for when, seconds in commits if first <= when <= last]
    figures = {"key_id": hottest, "links": len(chain) - 1,
               "others_end_s": round(others_end - first, 4) if others_end is not None else None,
               "shared": _figures(shared), "alone": _figures(alone),
               "commits_shared": _figures([s * 1000.0 for when, s in during
                                           if others_end is not None and when < others_end]),
               "commits_alone": _figures([s * 1000.0 for when, s in during
                                          if others_end is None or when >= others_end])}
    # The chain's time if each link took the mean commit of its part of the run: n commits in a row take
    # n x the mean, and under load the mean is well above the p50 (a tail of slow flushes).
    parts = [(figures[links]["count"], figures[probe]["mean_ms"])
             for links, probe in (("shared", "commits_shared"), ("alone", "commits_alone"))]
    span = last - first
    if span > 0 and all(mean is not None for count, mean in parts if count):
        bound_s = sum(count * mean for count, mean in parts if count) / 1000.0
        figures["bound_at_mean_commits_s"] = round(bound_s, 4)
        figures["share_at_mean_commits"] = round(bound_s / span, 4)
    return figures


def _figures(values_ms: list[float]) -> dict[str, Any]:
    """How many, and their mean, p50 and p90 (nearest rank), in ms."""
    if not values_ms:
        return {"count": 0, "mean_ms": None, "p50_ms": None, "p90_ms": None}
    ordered = sorted(values_ms)
    return {"count": len(ordered), "mean_ms": round(statistics.fmean(ordered), 3),
            "p50_ms": round(statistics.median(ordered), 3),
            "p90_ms": round(ordered[math.ceil(len(ordered) * 0.9) - 1], 3)}
