"""bench/commit_probe.py: the unit of a hot key's chain bound, measured in the same run.

The probe times real commits on a real PostgreSQL; the bound is the hottest
key's task count times that commit, and the share a run reached is the
chain's time over the run's span.
"""

from __future__ import annotations

import time

import psycopg2

from bench.commit_probe import CommitProbe, chain_bound, summarise


def test_chain_bound_is_links_times_one_commit() -> None:
    bound = chain_bound(links=1000, commit_p50_ms=0.5, tasks=5000, span_s=2.0)
    assert bound == {"chain_s": 0.5, "bound_tps": 10000.0, "share_of_bound": 0.25}


def test_chain_bound_without_figures_is_empty() -> None:
    empty = {"chain_s": None, "bound_tps": None, "share_of_bound": None}
    assert chain_bound(0, 0.5, 10, 1.0) == empty
    assert chain_bound(10, None, 10, 1.0) == empty
    assert chain_bound(10, 0.5, 10, None) == empty


def test_summarise_takes_the_median_and_the_90th_percentile() -> None:
    assert summarise([]) == {"samples": 0, "p50_ms": None, "p90_ms": None}
    figures = summarise([i / 1000 for i in range(1, 11)])  # 1..10 ms
    assert figures == {"samples": 10, "p50_ms": 5.5, "p90_ms": 9.0}


def test_the_probe_times_real_commits(dsn: str) -> None:
    probe = CommitProbe(dsn, interval=0.001).start()
    deadline = time.monotonic() + 30
    try:
        while len(probe.samples) < 5:
            assert time.monotonic() < deadline, "the probe made no commits"
            time.sleep(0.01)
    finally:
        figures = probe.stop()
    assert figures["samples"] >= 5 and figures["p50_ms"] > 0
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT n FROM bench_commit_probe WHERE id = 1")
        assert cur.fetchone()[0] == figures["samples"]  # each sample was one committed update
    conn.close()


def test_stop_ends_the_thread_and_closes_the_connection(dsn: str) -> None:
    probe = CommitProbe(dsn, interval=0.0).start()
    probe.stop()
    assert not probe._thread.is_alive() and probe.conn.closed
