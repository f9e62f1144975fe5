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

import math
import statistics
import threading
import time
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
                began = time.perf_counter()
                cur.execute(PROBE_SQL)
                self.samples.append(time.perf_counter() - began)
                self._stop.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        """Stop the probe; its figures: samples, p50 and p90 in ms (None without samples)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.conn.close()
        self.figures = summarise(self.samples)
        return self.figures


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
