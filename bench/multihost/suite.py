"""What the multihost benchmark's measurements share: the suites, the instances, the tasks table's checks."""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg2

from bench import measure
from bench.harness import MULTIHOST, Harness, daemon_config, fetch_rows, fetch_scalar
from bench.runners import Runner, RunnerFailed, RunnerSpec

SHARDS = 2  # per instance, in both measurements
POLL = 0.2  # seconds between the bench's polls of the database
CORES_NOTE = ("all instances run on this one machine and compete for the same {cores} cores (and with "
              "PostgreSQL): this shows what coordinating instances costs, not the speed-up of instances "
              "on separate machines")


@dataclass(frozen=True)
class Plan:
    """What one suite (smoke, quick, full) runs."""

    name: str
    takeover_repeats: int
    takeover_instances: int
    takeover_keys: int
    takeover_sleep_ms: float
    takeover_initial: int  # tasks in the first burst
    takeover_low_water: int  # top up when fewer unclaimed tasks wait, until every partition moved
    takeover_chunk: int
    hold_s: float  # every instance must have held partitions this long before the kill
    scale_tasks: int
    scale_keys: int
    scale_instances: tuple[int, ...]
    scale_repeats: int
    settings: tuple[str, ...] = ()  # daemon overrides of the suite itself (smoke: a short lease)
    routings: tuple[str, ...] = ("pinned", "hash")  # the scaling setups run with each, side by side
    join_repeats: int = 1  # join-and-leave runs (the takeover workload)
    mix_timed_tasks: int = 200  # tasks of the workloads whose tasks take time (mixes.py)
    mix_repeats: int = 1
    mix_names: tuple[str, ...] = ()  # which of mixes.py's workloads (empty: all)

    def with_instances(self, instances: int) -> Plan:
        factor = instances / 2
        return Plan(**{**asdict(self), "takeover_instances": instances,
                       "takeover_initial": round(self.takeover_initial * factor),
                       "takeover_low_water": round(self.takeover_low_water * factor),
                       "takeover_chunk": round(self.takeover_chunk * factor),
                       "scale_instances": self.scale_instances})


def plan_for(name: str) -> Plan:
    if name == "smoke":
        # A tiny run for CI: a 3 s lease (renewed every 1 s) so that a takeover fits in a test.
        return Plan("smoke", takeover_repeats=1, takeover_instances=2, takeover_keys=40, takeover_sleep_ms=20,
                    takeover_initial=300, takeover_low_water=100, takeover_chunk=100, hold_s=1.5,
                    scale_tasks=400, scale_keys=40, scale_instances=(1, 2), scale_repeats=1,
                    settings=("multihost.lease_seconds=3", "multihost.lease_renew_interval=1"),
                    routings=("pinned",), join_repeats=1, mix_timed_tasks=100, mix_names=("fixed20-zipf",))
    if name == "quick":
        return Plan("quick", takeover_repeats=3, takeover_instances=2, takeover_keys=200, takeover_sleep_ms=50,
                    takeover_initial=1000, takeover_low_water=200, takeover_chunk=200, hold_s=4.0,
                    scale_tasks=5000, scale_keys=500, scale_instances=(1, 2, 3), scale_repeats=1, join_repeats=2,
                    mix_timed_tasks=1500)
    if name == "full":
        return Plan("full", takeover_repeats=10, takeover_instances=2, takeover_keys=200, takeover_sleep_ms=50,
                    takeover_initial=1000, takeover_low_water=200, takeover_chunk=200, hold_s=5.0,
                    scale_tasks=20000, scale_keys=500, scale_instances=(1, 2, 3), scale_repeats=3, join_repeats=5,
                    mix_timed_tasks=5000, mix_repeats=2)
    raise ValueError(f"unknown suite {name!r}")


def summarise(values: list[float]) -> dict[str, Any]:
    """min / median / max (and n) of some seconds; all None when there are none."""
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": len(values), "min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


Key = tuple[str, int]

def ended_once_verdict(counts: dict[str, Any], inserted: int, in_flight_ids: set[int]) -> dict[str, Any]:
    """Every task ended exactly once; only the victim's in-flight tasks may have run again (reconciled)."""
    rerun = set(counts.get("rerun_ids") or [])
    unexplained = sorted(rerun - in_flight_ids)
    ok = (counts["total"] == inserted and counts["finished"] == inserted and counts["unended"] == 0
          and counts["bad_times"] == 0 and counts["never_marked"] == 0 and not unexplained)
    return {"ok": ok, "inserted": inserted, "total": counts["total"], "finished": counts["finished"],
            "failed": counts["failed"], "unended": counts["unended"], "bad_times": counts["bad_times"],
            "never_marked_running": counts["never_marked"], "reruns": len(rerun),
            "reruns_in_flight_at_kill": len(rerun & in_flight_ids), "reruns_unexplained": unexplained[:20]}


ENDED_SQL = """
SELECT count(*) AS total,
       count(*) FILTER (WHERE state = 'finished') AS finished,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       count(*) FILTER (WHERE state NOT IN ('finished', 'failed', 'canceled')) AS unended,
       count(*) FILTER (WHERE state <> 'canceled' AND (time_started IS NULL OR time_ended IS NULL
                                                        OR time_started > time_ended)) AS bad_times,
       count(*) FILTER (WHERE state IN ('finished', 'failed') AND attempts < 1) AS never_marked,
       coalesce(array_agg(id ORDER BY id) FILTER (WHERE attempts > 1), '{}') AS rerun_ids
FROM tasks
"""


def db_now(conn: Any) -> float:
    """The database's clock, epoch seconds."""
    return float(fetch_scalar(conn, "SELECT extract(epoch FROM clock_timestamp())::float8"))


def instance_ids_by_pid(conn: Any) -> dict[int, list[int]]:
    """Supervisor pid -> the instance ids it registered (a rejoin after a lost lease adds one)."""
    out: dict[int, list[int]] = defaultdict(list)
    for r in fetch_rows(conn, "SELECT id, pid FROM instances ORDER BY id"):
        out[int(r["pid"])].append(int(r["id"]))
    return dict(out)


# -- instances --------------------------------------------------------------------------------


@dataclass
class Ctx:
    harness: Harness
    overrides: list[str]
    bar: Any
    runs: int = 0

    def run_dir(self, label: str) -> Path:
        self.runs += 1
        return self.harness.base / f"run{self.runs:02d}-{label}"


@contextmanager
def instances(ctx: Ctx, dsn: str, count: int, multihost: bool, label: str,
              stagger: list[float] | None = None, routing: str | None = None) -> Iterator[list[Runner]]:
    """Start ``count`` daemons (2 shards each) on ``dsn`` and wait until each is READY; stop them all after.

    ``stagger``: seconds to wait before starting each one (its renewal and takeover timers start with it).
    ``routing``: the routing inside each instance (None: the daemon's default).
    """
    run_dir = ctx.run_dir(label)
    settings = ([MULTIHOST] if multihost else []) + ctx.overrides
    runners: list[Runner] = []
    try:
        for i in range(count):
            if stagger:
                time.sleep(stagger[i])
            runners.append(ctx.harness.start(RunnerSpec("taskomatic", SHARDS, routing), dsn,
                                             run_dir / f"instance{i + 1}", settings))
        for runner in runners:
            runner.wait_ready()
        yield runners
    finally:
        for runner in runners:
            ctx.harness.stop(runner, timeout=10)


@contextmanager
def run_database(ctx: Ctx, result: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """One run's fresh database and the bench's autocommit connection to it: (dsn, conn).

    A RunnerFailed inside ends the run with its message as ``result["error"]``; every instance still
    running is stopped on the way out, whatever happened.
    """
    with ctx.harness.fresh_database() as dsn:
        conn = psycopg2.connect(dsn, application_name="bench multihost")
        conn.autocommit = True
        try:
            yield dsn, conn
        except RunnerFailed as exc:
            result["error"] = str(exc)
            result.setdefault("checks", {})
        finally:
            ctx.harness.stop_all(timeout=5)
            conn.close()


def run_ok(result: dict[str, Any]) -> bool:
    """A run is ok with no error and every one of its checks (at least one) held."""
    return result["error"] is None and bool(result["checks"]) and all(result["checks"].values())


def kill_group(runner: Runner) -> None:
    """kill -9 of the runner's whole process group (its session: supervisor, fetcher, shards, reconciler)."""
    os.killpg(runner.pid, signal.SIGKILL)


def wait_group_gone(runner: Runner, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    runner.process.wait(timeout)
    while time.monotonic() < deadline:
        if not measure.group_members(runner.pid):
            return True
        time.sleep(0.02)
    return False


ANOMALIES = ("lease lost", "write refused", "rejoin", "Traceback", "ERROR", "died")


def resolved_settings(overrides: list[str]) -> dict[str, Any]:
    """The daemon's settings in multihost mode with ``overrides``."""
    return daemon_config([MULTIHOST, *overrides])

