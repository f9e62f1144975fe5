"""bench/commit_probe.py: the unit of a hot key's chain bound, measured in the same run.

The probe times real commits on a real PostgreSQL; the bound is the hottest
key's task count times that commit, and the share a run reached is the
chain's time over the run's span.
"""

from __future__ import annotations

import time

import psycopg2

from bench.commit_probe import CommitProbe, chain_bound, chain_links, summarise


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
    began = time.time()
    probe = CommitProbe(dsn, interval=0.001).start()
    deadline = time.monotonic() + 30
    try:
        while len(probe.samples) < 5:
            assert time.monotonic() < deadline, "the probe made no commits"
            time.sleep(0.01)
    finally:
        figures = probe.stop()
    assert figures["samples"] >= 5 and figures["p50_ms"] > 0
    timed = probe.timed()  # on the clock of the task rows, in order
    assert len(timed) == figures["samples"]
    assert began <= timed[0][0] and [w for w, _ in timed] == sorted(w for w, _ in timed) and timed[-1][0] <= time.time()
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT n FROM bench_commit_probe WHERE id = 1")
        assert cur.fetchone()[0] == figures["samples"]  # each sample was one committed update
    conn.close()


def test_stop_ends_the_thread_and_closes_the_connection(dsn: str) -> None:
    probe = CommitProbe(dsn, interval=0.0).start()
    probe.stop()
    assert not probe._thread.is_alive() and probe.conn.closed


def _row(key: int, started: float, ended: float) -> dict[str, float]:
    return {"key_id": key, "started": started, "ended": ended}


def test_chain_links_split_where_the_other_keys_end() -> None:
    # Key 7 is the hottest: links of 2 ms while key 1 runs (until t=4), then of 1 ms alone.
    hot = [_row(7, t, t + 0.0005) for t in (0.0, 0.002, 0.004, 0.005, 0.006)]
    others = [_row(1, 0.0, 0.003), _row(1, 0.003, 0.0045)]
    figures = chain_links(hot + others)
    assert figures["key_id"] == 7
    assert figures["links"] == 4
    assert figures["others_end_s"] == 0.0045
    assert figures["shared"] == {"count": 2, "mean_ms": 2.0, "p50_ms": 2.0, "p90_ms": 2.0}
    assert figures["alone"] == {"count": 2, "mean_ms": 1.0, "p50_ms": 1.0, "p90_ms": 1.0}
    assert figures["commits_shared"]["count"] == 0
    assert "share_at_mean_commits" not in figures  # no probe, no such bound


def test_chain_links_split_the_probe_commits_at_the_same_moment() -> None:
    hot = [_row(7, t, t + 0.0005) for t in (0.0, 0.002, 0.004, 0.005, 0.006)]
    # Commits at 1, 3 (beside key 1's work, which ends at 4.5 ms) and 5 ms (alone); one after the run.
    commits = [(0.001, 0.0015), (0.003, 0.0025), (0.005, 0.0008), (0.010, 0.0001)]
    figures = chain_links([*hot, _row(1, 0.0, 0.0045)], commits)
    assert figures["commits_shared"] == {"count": 2, "mean_ms": 2.0, "p50_ms": 2.0, "p90_ms": 2.5}
    assert figures["commits_alone"] == {"count": 1, "mean_ms": 0.8, "p50_ms": 0.8, "p90_ms": 0.8}
    # 2 links beside other work at a 2 ms mean commit, 2 alone at 0.8 ms: 5.6 ms of a 6.5 ms run.
    assert figures["bound_at_mean_commits_s"] == 0.0056
    assert figures["share_at_mean_commits"] == round(5.6 / 6.5, 4)


def test_chain_links_of_a_single_key_are_all_alone() -> None:
    figures = chain_links([_row(3, t, t + 0.001) for t in (0.0, 0.003, 0.005)])
    assert figures["others_end_s"] is None
    assert figures["shared"]["count"] == 0
    assert figures["alone"]["p50_ms"] == 2.5
    assert chain_links([]) == {"key_id": None}


def test_the_report_shows_the_chain_beside_other_work_and_alone() -> None:
    from bench.report import chain_section

    hot = [_row(7, t, t + 0.0005) for t in (0.0, 0.002, 0.004, 0.005, 0.006)]
    run = {"workload": "noop-zipf", "label": "taskomatic, 4 shards", "throughput_tps": 5400.0,
           "chain_bound": {"share_of_bound": 0.74}, "commit_probe": {"p50_ms": 0.7},
           "chain_links": chain_links([*hot, _row(1, 0.0, 0.0045)])}
    lines = chain_section({"runs": [run, {"workload": "noop-uniform", "label": "x"}]})
    row = [line for line in lines if line.startswith("| noop-zipf")]
    assert row == ["| noop-zipf | taskomatic, 4 shards | 5,400 | 0.74 | - | 0.70 | 2, 2.00, 2.00, 2.00 | - "
                   "| 2, 1.00, 1.00, 1.00 | - |"]
    assert chain_section({"runs": [{"workload": "noop-uniform", "label": "x"}]}) == []
