"""bench.run_figures.makespan_parts: a burst's makespan split into its planned work and what is added to it."""

from __future__ import annotations

import math

from bench.run_figures import makespan_parts


def _task(shard: int | None, started: float, ended: float) -> dict[str, float | int | None]:
    return {"run_by_shard": shard, "started": started, "ended": ended}


def test_the_parts_add_up_to_the_makespan() -> None:
    # Four 10 ms tasks on two shards, the first inserted at 0.
    ran = [_task(0, 0.001, 0.012), _task(0, 0.013, 0.024), _task(1, 0.002, 0.0125), _task(1, 0.0145, 0.025)]
    parts = makespan_parts(ran, 2, planned_s=0.04, first_created=0.0, last_end=0.025, bound_s=0.02)
    assert parts is not None
    assert parts["planned_per_shard_s"] == 0.02
    assert parts["start_s"] == 0.0015  # (1 + 2 ms) / 2
    assert parts["overrun_s"] == 0.0015  # 43 ms ran for 40 planned, over 2 shards
    assert parts["gaps_s"] == 0.0015  # (1 + 2 ms) / 2
    assert parts["end_idle_s"] == 0.0005  # shard 0 ended 1 ms before the last end
    assert parts["unused_s"] == 0.0
    total = sum(parts[k] for k in ("planned_per_shard_s", "start_s", "overrun_s", "gaps_s", "end_idle_s",
                                   "unused_s"))
    assert math.isclose(total, 0.025)
    assert parts["over_bound_s"] == 0.005
    assert parts["gap_ms"] == {"count": 2, "p50": 1.5, "mean": 1.5, "p90": 1.9}


def test_a_shard_that_ran_nothing_counts_as_idle() -> None:
    ran = [_task(0, 0.0, 0.01), _task(0, 0.011, 0.021)]
    parts = makespan_parts(ran, 2, planned_s=0.02, first_created=0.0, last_end=0.021, bound_s=0.01)
    assert parts is not None and parts["shards_used"] == 1
    assert parts["unused_s"] == 0.0105
    total = sum(parts[k] for k in ("planned_per_shard_s", "start_s", "overrun_s", "gaps_s", "end_idle_s",
                                   "unused_s"))
    assert math.isclose(total, 0.021)


def test_without_the_shard_of_every_task_there_are_no_parts() -> None:
    assert makespan_parts([_task(0, 0.0, 0.01), _task(None, 0.0, 0.01)], 2, 0.02, 0.0, 0.01, 0.01) is None


def test_the_report_shows_the_parts() -> None:
    from bench.report import makespan_section

    ran = [_task(0, 0.001, 0.012), _task(0, 0.013, 0.024), _task(1, 0.002, 0.0125), _task(1, 0.0145, 0.025)]
    run = {"workload": "sleep20-uniform", "label": "taskomatic 2 shards", "makespan_s": 0.025,
           "makespan_ratio": 1.25, "makespan_parts": makespan_parts(ran, 2, 0.04, 0.0, 0.025, 0.02)}
    lines = makespan_section({"runs": [run, {"workload": "noop-uniform", "label": "x"}]})
    assert [line for line in lines if line.startswith("| sleep20")] == [
        "| sleep20-uniform | taskomatic 2 shards | 0.025 | 1.250 | 0.020 | 0.002 | 0.002 | 0.002 | 0.001 | 0.000 "
        "| 1.50, 1.50, 1.90 |"]
    assert makespan_section({"runs": [{"workload": "noop-uniform", "label": "x"}]}) == []
