"""Multihost mode under load: ``python -m bench.multihost`` (``--quick``, the default; ``--full``; ``--smoke``).

Two measurements, with one private PostgreSQL (EmbeddedPostgres, fsync on) and
real daemon processes (``python -m taskomatic`` with the bench's ``noop``/``sleep``
plugin, started by :class:`bench.runners.Runner`, each in a process group of its own):

1. **Takeover after kill -9.** Two (``--instances 3``: three) multihost instances
   with 2 shards each share ``sleep`` tasks over many keys. Once every instance
   has held keys for a few seconds, one instance's whole process group gets
   SIGKILL; ``t0`` is ``SELECT clock_timestamp()`` right after the kill. Its keys
   (its ``key_claims`` rows, read once its processes are gone) must move: the
   bench records (a) when another instance first holds one of them, (b) when
   the first task of those keys starts under another instance
   (``tasks.time_started``), (c) when the last of them has moved. Times of key
   claims come from an audit trigger the bench adds to ``key_claims`` in its own
   database (one row per claim, takeover and release, stamped with
   ``clock_timestamp()`` in the claiming transaction), so no move is missed
   between two polls. The backlog is topped up while the bench waits, so the
   survivors stay busy until every key has moved; then the work drains, the
   survivors are stopped (SIGTERM) and the tasks table is checked: every task
   ended once (only the tasks in flight at the kill may have run twice: a
   ``sleep`` interrupted by a crash is reconciled as "not started" and run again
   in its place), per-key order held (``bench.measure.order_check``), no task of
   a moved key started elsewhere before the key moved, fencing tokens increased.

2. **Scaling over instances.** The same no-op burst through one standalone
   instance (the reference) and through 1, 2 and 3 multihost instances, 2 shards
   each, all on this machine: throughput, CPU of taskomatic and of PostgreSQL
   per 1,000 tasks, key claims per 1,000 tasks, and each instance's share.

Results: a summary printed as tables, and JSON (with the machine) written to
``bench/results/multihost-<stamp>.json`` or ``--out``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench import measure
from bench.plugin import write_dist_info
from bench.run import Interrupted, daemon_config, fresh_database, insert_tasks, machine_description, make_template
from bench.runners import REPO, Runner, RunnerFailed, RunnerSpec
from bench.workloads import PlannedTask, Workload, generate

RESULTS_DIR = REPO / "bench" / "results"
SCHEMA_VERSION = 1
SHARDS = 2  # per instance, in both measurements
POLL = 0.2  # seconds between the bench's polls of the database
MULTIHOST = "daemon.mode=multihost"  # what `--mode multihost` sets (cli.resolve_config: the same override)
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
    takeover_low_water: int  # top up when fewer unclaimed tasks wait, until every key moved
    takeover_chunk: int
    hold_s: float  # every instance must have held keys this long before the kill
    scale_tasks: int
    scale_keys: int
    scale_instances: tuple[int, ...]
    scale_repeats: int
    settings: tuple[str, ...] = ()  # daemon overrides of the suite itself (smoke: a short lease)

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
                    settings=("multihost.lease_seconds=3", "multihost.lease_renew_interval=1"))
    if name == "quick":
        return Plan("quick", takeover_repeats=3, takeover_instances=2, takeover_keys=200, takeover_sleep_ms=50,
                    takeover_initial=1000, takeover_low_water=200, takeover_chunk=200, hold_s=4.0,
                    scale_tasks=5000, scale_keys=500, scale_instances=(1, 2, 3), scale_repeats=1)
    if name == "full":
        return Plan("full", takeover_repeats=10, takeover_instances=2, takeover_keys=200, takeover_sleep_ms=50,
                    takeover_initial=1000, takeover_low_water=200, takeover_chunk=200, hold_s=5.0,
                    scale_tasks=20000, scale_keys=500, scale_instances=(1, 2, 3), scale_repeats=3)
    raise ValueError(f"unknown suite {name!r}")


# -- pure helpers -------------------------------------------------------------------------


def summarise(values: list[float]) -> dict[str, Any]:
    """min / median / max (and n) of some seconds; all None when there are none."""
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": len(values), "min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


Key = tuple[str, int]


def takeover_figures(t0: float, victim_ids: set[int], keys: dict[Key, int], events: list[dict[str, Any]],
                     starts: list[dict[str, Any]]) -> dict[str, Any]:
    """The takeover figures from the audit trail of ``key_claims`` and the tasks of the victim's keys.

    ``keys``: the victim's keys at the kill, with its token. ``events``: rows
    {at, op (claim/takeover/release), key_type, key_id, instance_id, previous, token, txid},
    times as epoch seconds on the database clock. ``starts``: {key_type, key_id, claimed_by,
    started} of every task of those keys that started after ``t0``. Seconds are from ``t0``.
    """
    moved: dict[Key, dict[str, Any]] = {}
    for e in sorted(events, key=lambda e: e["at"]):
        key = (e["key_type"], int(e["key_id"]))
        if key not in keys or key in moved or e["at"] < t0:
            continue
        if e["op"] in ("claim", "takeover") and e["instance_id"] not in victim_ids:
            moved[key] = e
    first_start: dict[Key, float] = {}
    early: list[dict[str, Any]] = []  # started elsewhere before the key had moved: a fencing failure
    for s in starts:
        key = (s["key_type"], int(s["key_id"]))
        if s["claimed_by"] in victim_ids or s["started"] < t0:
            continue
        if key not in moved or s["started"] < moved[key]["at"]:
            early.append({"key": f"{key[0]}:{key[1]}", "started_s": round(s["started"] - t0, 3),
                          "claimed_by": s["claimed_by"]})
        first_start[key] = min(first_start.get(key, s["started"]), s["started"])
    out: dict[str, Any] = {
        "keys_at_kill": len(keys),
        "keys_moved": len(moved),
        "first_key_s": round(min(e["at"] for e in moved.values()) - t0, 3) if moved else None,
        "all_keys_s": round(max(e["at"] for e in moved.values()) - t0, 3) if len(moved) == len(keys) and keys
        else None,
        "first_task_s": round(min(first_start.values()) - t0, 3) if first_start else None,
        "how": dict(Counter(e["op"] for e in moved.values())),
        "moved_to": {str(k): v for k, v in sorted(Counter(e["instance_id"] for e in moved.values()).items())},
        "takeover_transactions": len({(e["instance_id"], e["txid"]) for e in moved.values()
                                      if e["op"] == "takeover"}),
        "tokens_increased": all(e["token"] > keys[k] for k, e in moved.items()),
        "started_before_key_moved": early,
        "per_key": [{"key": f"{k[0]}:{k[1]}", "moved_s": round(e["at"] - t0, 3), "op": e["op"],
                     "to_instance_id": e["instance_id"], "old_token": keys[k], "new_token": e["token"],
                     "first_task_s": round(first_start[k] - t0, 3) if k in first_start else None}
                    for k, e in sorted(moved.items(), key=lambda kv: kv[1]["at"])],
    }
    return out


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


def results_path(out: Path | None, stamp: str) -> Path:
    """``--out``: a .json file, or a directory to put multihost-<stamp>.json in; default bench/results/."""
    if out is None:
        return RESULTS_DIR / f"multihost-{stamp}.json"
    if out.suffix == ".json":
        return out
    return out / f"multihost-{stamp}.json"


# -- the database ---------------------------------------------------------------------------

AUDIT_SQL = """
CREATE UNLOGGED TABLE bench_key_events (
    seq         bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    txid        bigint NOT NULL DEFAULT txid_current(),
    op          text NOT NULL,
    key_type    text NOT NULL,
    key_id      bigint NOT NULL,
    instance_id bigint,
    previous    bigint,
    token       bigint
);
CREATE FUNCTION bench_key_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO bench_key_events (op, key_type, key_id, instance_id, token)
        VALUES ('claim', NEW.key_type, NEW.key_id, NEW.instance_id, NEW.token);
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO bench_key_events (op, key_type, key_id, instance_id, previous, token)
        VALUES ('takeover', NEW.key_type, NEW.key_id, NEW.instance_id, OLD.instance_id, NEW.token);
    ELSE
        INSERT INTO bench_key_events (op, key_type, key_id, previous, token)
        VALUES ('release', OLD.key_type, OLD.key_id, OLD.instance_id, OLD.token);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER bench_key_events AFTER INSERT OR UPDATE OR DELETE ON key_claims
FOR EACH ROW EXECUTE FUNCTION bench_key_event();
"""

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


# Pauses: from a moment when no task runs on any instance to the next start anywhere.
PAUSE_SQL = """
WITH o AS (
    SELECT time_started AS s,
           max(time_ended) OVER (ORDER BY time_started, id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev
    FROM tasks WHERE time_started IS NOT NULL AND time_ended IS NOT NULL
)
SELECT max(extract(epoch FROM s - prev))::float8 AS longest,
       count(*) FILTER (WHERE s - prev > interval '100 milliseconds') AS over_100ms
FROM o
"""


def database_transactions(conn: Any) -> int:
    """Commits + rollbacks in this database so far (pg_stat_database: backends report them when idle or
    at exit, so a figure taken while daemons run may lag by their last second)."""
    return int(_scalar(conn, "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                             "WHERE datname = current_database()"))


def _rows(conn: Any, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _scalar(conn: Any, sql: str, params: Any = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


def _db_now(conn: Any) -> float:
    return float(_scalar(conn, "SELECT extract(epoch FROM clock_timestamp())::float8"))


def instance_ids_by_pid(conn: Any) -> dict[int, list[int]]:
    """Supervisor pid -> the instance ids it registered (a rejoin after a lost lease adds one)."""
    out: dict[int, list[int]] = defaultdict(list)
    for r in _rows(conn, "SELECT id, pid FROM instances ORDER BY id"):
        out[int(r["pid"])].append(int(r["id"]))
    return dict(out)


def key_claims_made(conn: Any) -> int:
    """Tokens handed out: key claims plus takeovers (every one takes a token from one sequence)."""
    row = _rows(conn, "SELECT last_value, is_called FROM key_claim_tokens")[0]
    return int(row["last_value"]) if row["is_called"] else 0


# -- instances --------------------------------------------------------------------------------


@dataclass
class Ctx:
    server_dsn: str
    postmaster_pid: int
    work_dir: Path
    plugin_path: Path
    overrides: list[str]
    bar: Any
    started: list[Runner] = field(default_factory=list)  # every runner started and not yet stopped
    runs: int = 0

    def run_dir(self, label: str) -> Path:
        self.runs += 1
        return self.work_dir / f"run{self.runs:02d}-{label}"


@contextmanager
def instances(ctx: Ctx, dsn: str, count: int, multihost: bool, label: str,
              stagger: list[float] | None = None) -> Iterator[list[Runner]]:
    """Start ``count`` daemons (2 shards each) on ``dsn`` and wait until each is READY; stop them all after.

    ``stagger``: seconds to wait before starting each one (its renewal and takeover timers start with it).
    """
    run_dir = ctx.run_dir(label)
    settings = ([MULTIHOST] if multihost else []) + ctx.overrides
    runners: list[Runner] = []
    try:
        for i in range(count):
            if stagger:
                time.sleep(stagger[i])
            runner = Runner(RunnerSpec("taskomatic", SHARDS), dsn, run_dir / f"instance{i + 1}", ctx.plugin_path,
                            1.0, settings)
            runners.append(runner)
            ctx.started.append(runner)
        for runner in runners:
            runner.wait_ready()
        yield runners
    finally:
        for runner in runners:
            stop(ctx, runner, timeout=10)


def stop(ctx: Ctx, runner: Runner, timeout: float = 30) -> int | None:
    """SIGTERM (drain), then SIGKILL to its group (``Runner.stop``); only once, and only while it is ours."""
    if runner not in ctx.started:
        return runner.process.returncode
    code = runner.stop(timeout=timeout)
    ctx.started.remove(runner)
    return code


def forget_killed(ctx: Ctx, runner: Runner) -> None:
    """A killed runner whose processes are all gone (checked): close what the bench holds of it.

    Not ``Runner.stop``: that signals the process group id once more, and with every member gone the
    id may belong to somebody else's new group by now.
    """
    if runner._log is not None:
        runner._log.close()
        runner._log = None
    runner._close_notify()
    if runner in ctx.started:
        ctx.started.remove(runner)


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


def _log_lines(runner: Runner, *needles: str) -> list[str]:
    try:
        text = runner.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if any(n in line for n in needles)]


ANOMALIES = ("lease lost", "write refused", "rejoin", "Traceback", "ERROR", "died")


# -- 1. takeover after kill -9 ----------------------------------------------------------------


def kill_jitter(seed: int, rep: int, renew_interval: float) -> float:
    """Extra wait before the kill, uniform over one renewal interval (seeded): the kill lands at a random
    point of the victim's renewal cycle, not at the same phase in every repetition."""
    return random.Random(f"taskomatic-bench-multihost:{seed}:{rep}").uniform(0.0, renew_interval)


def start_stagger(seed: int, rep: int, count: int, renew_interval: float) -> list[float]:
    """Waits before starting each instance: the first at once, each other one after a random part of a
    renewal interval (seeded). An instance renews its lease and looks for keys to take over on timers
    that start with it; started together, every survivor's takeover check would fall at about the same
    point of the victim's renewal cycle in every repetition, as it would not across real machines."""
    rng = random.Random(f"taskomatic-bench-multihost-start:{seed}:{rep}")
    return [0.0] + [rng.uniform(0.0, renew_interval) for _ in range(count - 1)]


def run_takeover(ctx: Ctx, plan: Plan, rep: int, tasks: list[PlannedTask], seed: int) -> dict[str, Any]:
    n = plan.takeover_instances
    victim_index = rep % n
    renew = float(resolved_settings(ctx.overrides)["lease_renew_interval"])
    jitter = kill_jitter(seed, rep, renew)
    stagger = start_stagger(seed, rep, n, renew)
    result: dict[str, Any] = {"repetition": rep + 1, "instances": n, "victim": victim_index + 1, "error": None,
                              "kill_jitter_s": round(jitter, 3), "start_stagger_s": [round(x, 3) for x in stagger]}
    started = time.monotonic()
    bar = ctx.bar
    with fresh_database(ctx.server_dsn) as dsn:
        conn = psycopg2.connect(dsn, application_name="bench multihost")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(AUDIT_SQL)
            with instances(ctx, dsn, n, True, f"takeover-r{rep + 1}", stagger) as runners:
                pids = instance_ids_by_pid(conn)
                ids = {i: set(pids.get(r.pid, [])) for i, r in enumerate(runners)}
                # The bench's numbering (start order) is not the daemon's instance ids (registration order).
                result["instance_ids"] = {f"instance {i + 1}": sorted(v) for i, v in ids.items()}
                victim = runners[victim_index]
                inserted = 0

                def top_up() -> None:
                    nonlocal inserted
                    waiting = _scalar(conn, "SELECT count(*) FROM tasks WHERE state = 'queued' "
                                            "AND claimed_by IS NULL")
                    if waiting < plan.takeover_low_water and inserted < len(tasks):
                        chunk = tasks[inserted:inserted + plan.takeover_chunk]
                        insert_tasks(conn, chunk)
                        inserted += len(chunk)

                insert_tasks(conn, tasks[:plan.takeover_initial])
                inserted = plan.takeover_initial
                burst_at = time.monotonic()
                # Wait until every instance has held keys for hold_s + jitter (and the victim holds some now).
                hold = plan.hold_s + jitter
                first_held: dict[int, float] = {}
                deadline = time.monotonic() + 60 + hold
                while True:
                    now = time.monotonic()
                    held = Counter(int(r["instance_id"]) for r in _rows(conn, "SELECT instance_id FROM key_claims"))
                    for i in range(n):
                        if any(held.get(x) for x in ids[i]):
                            first_held.setdefault(i, now)
                    victim_holds = sum(held.get(x, 0) for x in ids[victim_index])
                    if (len(first_held) == n and victim_holds > 0
                            and min(now - t for t in first_held.values()) >= hold):
                        break
                    if now > deadline:
                        raise RunnerFailed(f"not every instance held keys for {hold:.1f}s within "
                                           f"{deadline - burst_at:.0f}s (holding: {dict(held)})")
                    for i, r in enumerate(runners):
                        if r.process.poll() is not None:
                            raise RunnerFailed(f"instance {i + 1} exited with {r.process.returncode}:\n"
                                               f"{r.log_tail()}")
                    top_up()
                    bar.set_postfix_str(f"takeover {rep + 1}: instances holding keys {len(first_held)}/{n}")
                    time.sleep(POLL)
                result["kill_after_burst_s"] = round(time.monotonic() - burst_at, 3)
                keys_before = {(r["key_type"], int(r["key_id"])): int(r["token"]) for r in _rows(
                    conn, "SELECT key_type, key_id, token FROM key_claims WHERE instance_id = ANY(%s)",
                    (sorted(ids[victim_index]),))}
                kill_group(victim)
                t0 = _db_now(conn)
                killed_at = time.monotonic()
                busy_at_kill = measure.machine_busy_seconds()
                result["victim_processes_gone"] = wait_group_gone(victim)
                if result["victim_processes_gone"]:
                    forget_killed(ctx, victim)
                time.sleep(max(0.0, 0.3 - (time.monotonic() - killed_at)))  # a commit in flight lands
                victim_ids = ids[victim_index]
                keys = {(r["key_type"], int(r["key_id"])): int(r["token"]) for r in _rows(
                    conn, "SELECT key_type, key_id, token FROM key_claims WHERE instance_id = ANY(%s)",
                    (sorted(victim_ids),))}
                lease = _rows(conn, "SELECT extract(epoch FROM max(lease_expires_at))::float8 AS expires "
                                    "FROM instances WHERE id = ANY(%s)", (sorted(victim_ids),))[0]["expires"]
                in_flight = _rows(conn, "SELECT id, state FROM tasks WHERE claimed_by = ANY(%s) "
                                        "AND state IN ('queued', 'running')", (sorted(victim_ids),))
                in_flight_ids = {int(r["id"]) for r in in_flight if r["state"] == "running"}
                unended_at_kill = {(r["key_type"], int(r["key_id"])): int(r["n"]) for r in _rows(conn, """
                    SELECT key_type, key_id, count(*) AS n FROM tasks
                    WHERE state IN ('queued', 'running')
                      AND (key_type, key_id) IN (SELECT * FROM unnest(%s::text[], %s::bigint[]))
                    GROUP BY key_type, key_id""", ([k[0] for k in keys], [k[1] for k in keys]))}
                if not keys:
                    result["error"] = "the killed instance held no keys at the kill (released between the snapshot " \
                                      "and the kill)"
                result.update({
                    "victim_instance_ids": sorted(victim_ids),
                    "keys_before_kill": len(keys_before), "keys_at_kill": len(keys),
                    "keys_changed_between_snapshot_and_kill": sorted(f"{k[0]}:{k[1]}" for k in
                                                                     set(keys) ^ set(keys_before)),
                    "victim_lease_left_at_kill_s": round(lease - t0, 3) if lease is not None else None,
                    "victim_tasks_running_at_kill": len(in_flight_ids),
                    "victim_tasks_claimed_queued_at_kill": sum(r["state"] == "queued" for r in in_flight),
                })
                # Wait until every one of its keys is held by another instance (or was, and got released).
                limit = 3 * _lease_seconds(ctx) + 30
                moved = 0
                while True:
                    moved = int(_scalar(conn, """
                        SELECT count(DISTINCT (key_type, key_id)) FROM bench_key_events
                        WHERE op IN ('claim', 'takeover') AND at >= to_timestamp(%s)
                          AND NOT (instance_id = ANY(%s))
                          AND (key_type, key_id) IN (SELECT * FROM unnest(%s::text[], %s::bigint[]))""",
                                        (t0, sorted(victim_ids), [k[0] for k in keys], [k[1] for k in keys])))
                    elapsed = time.monotonic() - killed_at
                    bar.set_postfix_str(f"takeover {rep + 1}: t0+{elapsed:.1f}s, {moved}/{len(keys)} keys moved")
                    if moved >= len(keys):
                        break
                    if elapsed > limit:
                        result["error"] = f"only {moved} of {len(keys)} keys moved within {limit:.0f}s of the kill"
                        break
                    for i, r in enumerate(runners):
                        if i != victim_index and r.process.poll() is not None:
                            raise RunnerFailed(f"surviving instance {i + 1} exited with {r.process.returncode}:"
                                               f"\n{r.log_tail()}")
                    top_up()
                    time.sleep(POLL)
                window = time.monotonic() - killed_at
                # Everything the machine did meanwhile (the daemons, PostgreSQL, the bench and anything else).
                result["machine_busy_share_until_moved"] = round(
                    (measure.machine_busy_seconds() - busy_at_kill) / (window * (os.cpu_count() or 1)), 3)
                result["tasks_inserted"] = inserted
                # Drain: wait until every task has ended (the survivors only now).
                drain_limit = 120 + inserted * plan.takeover_sleep_ms / 1000.0
                drain_start = time.monotonic()
                while True:
                    left = int(_scalar(conn, "SELECT count(*) FROM tasks WHERE state IN ('queued', 'running')"))
                    bar.set_postfix_str(f"takeover {rep + 1}: draining, {left} tasks left")
                    if left == 0:
                        break
                    if time.monotonic() - drain_start > drain_limit:
                        result["error"] = result["error"] or f"{left} tasks had not ended {drain_limit:.0f}s " \
                                                             "after the keys moved"
                        break
                    time.sleep(POLL)
                codes = [stop(ctx, r) for i, r in enumerate(runners) if i != victim_index]
                result["survivor_exit_codes"] = codes
                if any(c != 0 for c in codes) and result["error"] is None:
                    result["error"] = f"a surviving instance did not stop cleanly on SIGTERM (exit codes {codes})"
                result["log_notes"] = {f"instance {i + 1}": _log_lines(r, "took over", *ANOMALIES)[:30]
                                       for i, r in enumerate(runners)}
            # Everything from the database, now final.
            events = _rows(conn, """
                SELECT extract(epoch FROM at)::float8 AS at, txid, op, key_type, key_id, instance_id, previous, token
                FROM bench_key_events ORDER BY seq""")
            starts = _rows(conn, """
                SELECT key_type, key_id, claimed_by, extract(epoch FROM time_started)::float8 AS started
                FROM tasks
                WHERE (key_type, key_id) IN (SELECT * FROM unnest(%s::text[], %s::bigint[]))
                  AND time_started >= to_timestamp(%s)""",
                           ([k[0] for k in keys], [k[1] for k in keys], t0))
            figures = takeover_figures(t0, victim_ids, keys, events, starts)
            for row in figures["per_key"]:  # unended tasks of the key at the kill (a drained key has none)
                kind, _, ident = row["key"].partition(":")
                row["tasks_left_at_kill"] = unended_at_kill.get((kind, int(ident)), 0)
            result.update(figures)
            settled = _rows(conn, "SELECT extract(epoch FROM max(time_ended))::float8 AS ended, "
                                  "count(*) FILTER (WHERE attempts > 1) AS rerun FROM tasks WHERE id = ANY(%s)",
                            (sorted(in_flight_ids),))[0]
            result["in_flight_settled_s"] = (round(settled["ended"] - t0, 3) if settled["ended"] is not None
                                             else None)
            result["ended_once"] = ended_once_verdict(_rows(conn, ENDED_SQL)[0], result["tasks_inserted"],
                                                      in_flight_ids)
            result["order"] = measure.order_check(conn)
            result["key_claims_left"] = int(_scalar(conn, "SELECT count(*) FROM key_claims"))
            per_pid = instance_ids_by_pid(conn)
            result["rejoined"] = {f"instance {i + 1}": len(per_pid.get(r.pid, [])) - 1 for i, r in enumerate(runners)
                                  if len(per_pid.get(r.pid, [])) > 1}
            share = {int(r["claimed_by"]): int(r["n"]) for r in _rows(
                conn, "SELECT claimed_by, count(*) AS n FROM tasks GROUP BY claimed_by") if r["claimed_by"]}
            result["tasks_by_instance"] = {f"instance {i + 1}": sum(share.get(x, 0) for x in per_pid.get(r.pid, []))
                                           for i, r in enumerate(runners)}
            result["moved_to"] = {f"instance {i + 1}": sum(figures["moved_to"].get(str(x), 0)
                                                          for x in per_pid.get(r.pid, []))
                                  for i, r in enumerate(runners) if i != victim_index}
            result["checks"] = {
                "ended_once": result["ended_once"]["ok"],
                "order": result["order"]["ok"],
                "all_keys_moved": figures["keys_moved"] == figures["keys_at_kill"],
                "no_start_before_key_moved": not figures["started_before_key_moved"],
                "tokens_increased": figures["tokens_increased"],
                "no_key_claims_left": result["key_claims_left"] == 0,
                "no_rejoin": not result["rejoined"],
            }
        except RunnerFailed as exc:
            result["error"] = str(exc)
            result.setdefault("checks", {})
        finally:
            for runner in list(ctx.started):
                stop(ctx, runner, timeout=5)
            conn.close()
    result["ok"] = result["error"] is None and bool(result["checks"]) and all(result["checks"].values())
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def _lease_seconds(ctx: Ctx) -> float:
    return float(resolved_settings(ctx.overrides)["lease_seconds"])


# -- 2. scaling over instances ------------------------------------------------------------------


def run_scaling(ctx: Ctx, plan: Plan, count: int, multihost: bool, rep: int,
                tasks: list[PlannedTask]) -> dict[str, Any]:
    label = f"{count} multihost" if multihost else "standalone"
    result: dict[str, Any] = {"setup": label, "mode": "multihost" if multihost else "standalone",
                              "instances": count, "shards_per_instance": SHARDS, "repetition": rep + 1,
                              "tasks": len(tasks), "error": None}
    started = time.monotonic()
    with fresh_database(ctx.server_dsn) as dsn:
        conn = psycopg2.connect(dsn, application_name="bench multihost")
        conn.autocommit = True
        try:
            with instances(ctx, dsn, count, multihost, f"scale-{'mh' if multihost else 'sa'}{count}-r{rep + 1}") \
                    as runners:
                stats = measure.all_stats()
                before = [measure.cpu_snapshot(measure.group_members(r.pid, stats)) for r in runners]
                pg_before = measure.cpu_snapshot(measure.tree_members(ctx.postmaster_pid, stats))
                machine_before, self_before = measure.machine_busy_seconds(), measure.self_cpu_seconds()
                xacts_before = database_transactions(conn)
                wall_start = time.monotonic()
                insert_tasks(conn, tasks)
                limit = 120 + len(tasks) / 50.0
                while True:
                    left = int(_scalar(conn, "SELECT count(*) FROM tasks WHERE state IN ('queued', 'running')"))
                    ctx.bar.set_postfix_str(f"scaling {label}: {len(tasks) - left}/{len(tasks)} tasks ended")
                    if left == 0:
                        break
                    if time.monotonic() - wall_start > limit:
                        result["error"] = f"{left} tasks had not ended within {limit:.0f}s"
                        break
                    for i, r in enumerate(runners):
                        if r.process.poll() is not None:
                            raise RunnerFailed(f"instance {i + 1} exited with {r.process.returncode}:\n"
                                               f"{r.log_tail()}")
                    time.sleep(POLL)
                wall = time.monotonic() - wall_start
                machine = measure.machine_busy_seconds() - machine_before
                bench_cpu = measure.self_cpu_seconds() - self_before
                stats = measure.all_stats()
                cpu = [measure.cpu_seconds(b, measure.cpu_snapshot(measure.group_members(r.pid, stats)))
                       for b, r in zip(before, runners, strict=True)]
                pg_cpu = measure.cpu_seconds(pg_before, measure.cpu_snapshot(
                    measure.tree_members(ctx.postmaster_pid, stats)))
                codes = [stop(ctx, r) for r in runners]
                result["exit_codes"] = codes
                if any(c != 0 for c in codes) and result["error"] is None:
                    result["error"] = f"an instance did not stop cleanly on SIGTERM (exit codes {codes})"
                result["log_notes"] = {f"instance {i + 1}": _log_lines(r, *ANOMALIES)[:30]
                                       for i, r in enumerate(runners)}
                per_pid = instance_ids_by_pid(conn)
                ids = [per_pid.get(r.pid, []) for r in runners]
            total_cpu = sum(cpu)
            other = max(0.0, machine - total_cpu - pg_cpu - bench_cpu)
            result["wall_s"] = round(wall, 3)
            result["cpu"] = {
                "taskomatic_s": round(total_cpu, 3), "taskomatic_s_per_instance": [round(c, 3) for c in cpu],
                "postgres_s": round(pg_cpu, 3), "bench_s": round(bench_cpu, 3),
                "taskomatic_s_per_1k": round(total_cpu / len(tasks) * 1000, 4),
                "postgres_s_per_1k": round(pg_cpu / len(tasks) * 1000, 4),
                "machine_busy_s": round(machine, 3), "other_s": round(other, 3),
                "other_share": round(other / (wall * (os.cpu_count() or 1)), 4) if wall > 0 else None,
            }
            span = _rows(conn, """
                SELECT count(*) AS n, extract(epoch FROM max(time_ended) - min(time_started))::float8 AS span,
                       extract(epoch FROM max(time_ended) - min(created_at))::float8 AS makespan
                FROM tasks WHERE time_started IS NOT NULL AND time_ended IS NOT NULL""")[0]
            result["throughput_tps"] = round(span["n"] / span["span"], 1) if span["span"] else None
            pause = _rows(conn, PAUSE_SQL)[0]
            # Every task was queued from the burst on, so a moment when no task runs anywhere is work waiting.
            result["pauses"] = {"longest_s": round(pause["longest"] or 0.0, 3),
                                "over_100ms": int(pause["over_100ms"] or 0)}
            time.sleep(0.5)  # the daemons' backends have exited; their statistics land
            xacts = database_transactions(conn) - xacts_before
            result["db_transactions"] = xacts
            result["db_transactions_per_task"] = round(xacts / len(tasks), 2)
            result["makespan_s"] = round(span["makespan"], 3) if span["makespan"] is not None else None
            share = {int(r["claimed_by"]): int(r["n"]) for r in _rows(
                conn, "SELECT claimed_by, count(*) AS n FROM tasks GROUP BY claimed_by") if r["claimed_by"]}
            per_instance = [sum(share.get(x, 0) for x in group) for group in ids]
            result["tasks_per_instance"] = per_instance
            result["share_per_instance"] = [round(c / len(tasks), 4) for c in per_instance]
            if multihost:
                claims = key_claims_made(conn)
                result["key_claims"] = claims
                result["key_claims_per_1k"] = round(claims / len(tasks) * 1000, 1)
            result["ended_once"] = ended_once_verdict(_rows(conn, ENDED_SQL)[0], len(tasks), set())
            result["order"] = measure.order_check(conn)
            result["rejoined"] = sum(len(g) - 1 for g in ids if len(g) > 1)
            result["checks"] = {"ended_once": result["ended_once"]["ok"], "order": result["order"]["ok"],
                                "no_rejoin": result["rejoined"] == 0}
        except RunnerFailed as exc:
            result["error"] = str(exc)
            result.setdefault("checks", {})
        finally:
            for runner in list(ctx.started):
                stop(ctx, runner, timeout=5)
            conn.close()
    result["ok"] = result["error"] is None and bool(result["checks"]) and all(result["checks"].values())
    result["run_wall_s"] = round(time.monotonic() - started, 1)
    return result


def scaling_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setup: the median of its repetitions; ratios to the standalone reference."""
    setups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        setups[r["setup"]].append(r)

    def med(rows: list[dict[str, Any]], get: Any) -> float | None:
        values = [v for v in (get(r) for r in rows) if v is not None]
        return round(statistics.median(values), 4) if values else None

    out = []
    for setup, rows in setups.items():
        shares = [r["share_per_instance"] for r in rows if r.get("share_per_instance")]
        out.append({
            "setup": setup, "mode": rows[0]["mode"], "instances": rows[0]["instances"], "runs": len(rows),
            "ok": all(r["ok"] for r in rows),
            "throughput_tps": med(rows, lambda r: r.get("throughput_tps")),
            "throughput_tps_all": [r.get("throughput_tps") for r in rows],
            "taskomatic_cpu_s_per_1k": med(rows, lambda r: (r.get("cpu") or {}).get("taskomatic_s_per_1k")),
            "postgres_cpu_s_per_1k": med(rows, lambda r: (r.get("cpu") or {}).get("postgres_s_per_1k")),
            "key_claims_per_1k": med(rows, lambda r: r.get("key_claims_per_1k")),
            "db_transactions_per_task": med(rows, lambda r: r.get("db_transactions_per_task")),
            "longest_pause_s": med(rows, lambda r: (r.get("pauses") or {}).get("longest_s")),
            "other_share_max": max(((r.get("cpu") or {}).get("other_share") or 0.0) for r in rows),
            "share_per_instance": shares[len(shares) // 2] if shares else None,
        })
    reference = next((s for s in out if s["mode"] == "standalone"), None)
    for s in out:
        ref = reference["throughput_tps"] if reference else None
        s["throughput_vs_standalone"] = round(s["throughput_tps"] / ref, 3) if ref and s["throughput_tps"] else None
    return out


# -- the suite --------------------------------------------------------------------------------------


def resolved_settings(overrides: list[str]) -> dict[str, Any]:
    return daemon_config([MULTIHOST, *overrides])


def run_all(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    from tqdm import tqdm

    from taskomatic.embedded.postgres import EmbeddedPostgres

    overrides = [*plan.settings, *(args.set or [])]
    started_at = datetime.now(UTC)
    wall_start = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="taskomatic-bench-mh-", dir="/tmp"))
    base.chmod(0o755)  # the unprivileged PostgreSQL user must reach it
    pg = EmbeddedPostgres(base / "postgres")
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_term(_signum: int, _frame: object) -> None:
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    takeover_runs: list[dict[str, Any]] = []
    scaling_runs: list[dict[str, Any]] = []
    do_takeover = args.only in (None, "takeover")
    do_scaling = args.only in (None, "scaling")
    takeover_workload = Workload("takeover", plan.takeover_initial + 400 * plan.takeover_chunk, plan.takeover_keys,
                                 latency="fixed", base_ms=plan.takeover_sleep_ms)
    scale_workload = Workload("scaling-noop", plan.scale_tasks, plan.scale_keys)
    scale_setups = [(1, False), *((n, True) for n in plan.scale_instances)]
    ctx: Ctx | None = None
    try:
        print(f"bench work directory: {base}", flush=True)
        pg.start()
        assert pg.pid is not None
        make_template(pg.dsn)
        conn = psycopg2.connect(pg.dsn)
        machine = machine_description(conn)
        conn.close()
        plugin_path = write_dist_info(base / "plugin")
        total = (plan.takeover_repeats if do_takeover else 0) + \
            (plan.scale_repeats * len(scale_setups) if do_scaling else 0)
        with tqdm(total=total, unit="run", dynamic_ncols=True, disable=args.no_progress, file=sys.stderr) as bar:
            ctx = Ctx(pg.dsn, pg.pid, base, plugin_path, overrides, bar)
            if do_takeover:
                tasks = generate(takeover_workload, args.seed)
                for rep in range(plan.takeover_repeats):
                    bar.set_description(f"takeover {rep + 1}/{plan.takeover_repeats}")
                    result = run_takeover(ctx, plan, rep, tasks, args.seed)
                    takeover_runs.append(result)
                    bar.write(_takeover_line(result))
                    bar.update(1)
            if do_scaling:
                tasks = generate(scale_workload, args.seed)
                for rep in range(plan.scale_repeats):
                    for count, multihost in scale_setups:
                        label = f"{count} multihost" if multihost else "standalone"
                        bar.set_description(f"scaling {label}")
                        result = run_scaling(ctx, plan, count, multihost, rep, tasks)
                        scaling_runs.append(result)
                        bar.write(_scaling_line(result))
                        bar.update(1)
    finally:
        if ctx is not None:
            for runner in list(ctx.started):
                stop(ctx, runner, timeout=5)
        pg.stop()
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
        if args.keep_work_dir:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    resolved = resolved_settings(overrides)
    multihost_settings = {k: resolved[k] for k in ("lease_seconds", "lease_renew_interval", "keys_per_shard",
                                                     "tasks_per_key")}
    takeover: dict[str, Any] | None = None
    if do_takeover:
        takeover = {
            "workload": {**takeover_workload.to_json(), "tasks": None,
                         "description": f"sleep {plan.takeover_sleep_ms:g} ms tasks over {plan.takeover_keys} "
                                        f"keys (uniform): a burst of {plan.takeover_initial}, topped up by "
                                        f"{plan.takeover_chunk} whenever fewer than {plan.takeover_low_water} "
                                        "unclaimed tasks wait, until every key of the killed instance moved"},
            "instances": plan.takeover_instances, "shards_per_instance": SHARDS, "repeats": plan.takeover_repeats,
            "hold_s": plan.hold_s, "runs": takeover_runs,
            "summary": {name: summarise([r[name] for r in takeover_runs if r.get(name) is not None])
                        for name in ("first_key_s", "first_task_s", "all_keys_s", "victim_lease_left_at_kill_s",
                                     "in_flight_settled_s")},
            "ok": bool(takeover_runs) and all(r["ok"] for r in takeover_runs),
        }
    scaling: dict[str, Any] | None = None
    if do_scaling:
        scaling = {"workload": scale_workload.to_json(), "shards_per_instance": SHARDS,
                   "repeats": plan.scale_repeats, "note": CORES_NOTE.format(cores=machine.get("cores")),
                   "runs": scaling_runs, "summary": scaling_summary(scaling_runs),
                   "ok": bool(scaling_runs) and all(r["ok"] for r in scaling_runs)}
    return {
        "kind": "multihost",
        "schema": SCHEMA_VERSION,
        "suite": plan.name,
        "seed": args.seed,
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - wall_start, 1),
        "machine": machine,
        "settings": {"overrides": overrides, "multihost": multihost_settings,
                     "defaults": not overrides, "daemon_config": resolved, "command": " ".join(sys.argv),
                     "poll_s": POLL},
        "takeover": takeover,
        "scaling": scaling,
        "ok": all(part["ok"] for part in (takeover, scaling) if part is not None),
    }


# -- output -------------------------------------------------------------------------------------------


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _takeover_line(r: dict[str, Any]) -> str:
    if r.get("first_key_s") is None and r.get("error"):
        return f"  takeover {r['repetition']}: FAILED: {r['error'].splitlines()[0]}"
    verdict = "checks ok" if r["ok"] else f"CHECKS FAILED {[k for k, v in r.get('checks', {}).items() if not v]}"
    error = f" ({r['error'].splitlines()[0]})" if r.get("error") else ""
    return (f"  takeover {r['repetition']}: {r.get('keys_at_kill')} keys; first key {_s(r.get('first_key_s'))} s, "
            f"first task {_s(r.get('first_task_s'))} s, all keys {_s(r.get('all_keys_s'))} s after the kill "
            f"(its lease had {_s(r.get('victim_lease_left_at_kill_s'))} s left); {verdict}{error}")


def _scaling_line(r: dict[str, Any]) -> str:
    if r.get("throughput_tps") is None:
        return f"  scaling {r['setup']}: FAILED: {(r.get('error') or '?').splitlines()[0]}"
    verdict = "checks ok" if r["ok"] else f"CHECKS FAILED {[k for k, v in r.get('checks', {}).items() if not v]}"
    return (f"  scaling {r['setup']}: {r['throughput_tps']:.0f} tasks/s, shares "
            f"{'/'.join(f'{s:.0%}' for s in r['share_per_instance'])}; {verdict}")


def render_summary(results: dict[str, Any]) -> str:
    from bench.report import _machine_line

    out = [f"taskomatic multihost benchmark, {results['suite']} suite, seed {results['seed']}, "
           f"{results['started_at']}, {results['wall_s']:.0f} s",
           f"Machine: {_machine_line(results['machine'])}"]
    settings = results["settings"]
    mh = settings["multihost"]
    which = "default settings" if settings["defaults"] else "overrides " + ", ".join(settings["overrides"])
    out.append(f"Daemon: {which}"
               f" (lease_seconds {mh['lease_seconds']:g}, lease_renew_interval {mh['lease_renew_interval']:g}, "
               f"keys_per_shard {mh['keys_per_shard']}, tasks_per_key {mh['tasks_per_key']}); "
               f"{SHARDS} shards per instance")
    takeover = results.get("takeover")
    if takeover:
        runs = takeover["runs"]
        renew = results["settings"]["multihost"]["lease_renew_interval"]
        out += ["", f"1. Takeover after kill -9 of one of {takeover['instances']} instances "
                    f"({takeover['repeats']} repetition{'s' if takeover['repeats'] != 1 else ''}; "
                    f"{takeover['workload']['description']})",
                f"   instances started a random 0 to {renew:g} s apart; killed once every instance had held keys "
                f"for {takeover['hold_s']:g} s plus a random 0 to {renew:g} s (one renewal interval);",
                "   seconds from t0 = SELECT clock_timestamp() right after the SIGKILL, on the database clock", ""]
        rows = [("(a) another instance holds its first key", "first_key_s"),
                ("(b) first task of its keys starts elsewhere", "first_task_s"),
                ("(c) all its keys moved", "all_keys_s"),
                ("its lease had left at the kill", "victim_lease_left_at_kill_s"),
                ("its in-flight tasks all settled", "in_flight_settled_s")]
        out.append(f"| {'figure':<44} | {'min':>6} | {'median':>6} | {'max':>6} | per run")
        out.append(f"|{'-' * 46}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 20}")
        for title, name in rows:
            s = takeover["summary"][name]
            per = ", ".join(_s(r.get(name)) for r in runs)
            out.append(f"| {title:<44} | {_s(s['min']):>6} | {_s(s['median']):>6} | {_s(s['max']):>6} | {per}")
        keys = ", ".join(str(r.get("keys_at_kill")) for r in runs)
        running = ", ".join(str(r.get("victim_tasks_running_at_kill")) for r in runs)
        rounds = ", ".join(str(r.get("takeover_transactions")) for r in runs)
        busy = ", ".join(f"{r['machine_busy_share_until_moved']:.0%}" if r.get("machine_busy_share_until_moved")
                         is not None else "-" for r in runs)
        out += ["", f"keys held by the killed instance: {keys}; its tasks running at the kill: {running}; "
                    f"takeover transactions that moved them: {rounds}",
                f"machine busy (all processes, all cores) from the kill until its keys moved: {busy}"]
        failed = {name for r in runs for name, ok in r.get("checks", {}).items() if not ok}
        errors = [r["error"].splitlines()[0] for r in runs if r.get("error")]
        out.append("correctness (every task ended once, per-key order, no start before its key moved, tokens "
                   "increased, no claims left, no rejoin): "
                   + ("ok in every run" if takeover["ok"] else f"FAILED: {sorted(failed)} {errors}"))
    scaling = results.get("scaling")
    if scaling:
        w = scaling["workload"]
        out += ["", f"2. Scaling over instances: {w['description']}, {scaling['shards_per_instance']} shards per "
                    f"instance, {scaling['repeats']} run(s) per setup (median)",
                f"   NOTE: {scaling['note']}.", ""]
        out.append(f"| {'setup':<12} | {'tasks/s':>8} | {'vs SA':>6} | {'tkm CPU s/1k':>12} | {'PG CPU s/1k':>11} "
                   f"| {'key claims/1k':>13} | {'xact/task':>9} | {'pause s':>7} | share per instance | other load "
                   "| checks")
        out.append(f"|{'-' * 14}|{'-' * 10}|{'-' * 8}|{'-' * 14}|{'-' * 13}|{'-' * 15}|{'-' * 11}|{'-' * 9}|{'-' * 20}"
                   f"|{'-' * 12}|{'-' * 8}")
        for s in scaling["summary"]:
            share = " / ".join(f"{v:.0%}" for v in s["share_per_instance"] or [])
            out.append(f"| {s['setup']:<12} | {_s(s['throughput_tps'], 0):>8} | {_s(s['throughput_vs_standalone']):>6} "
                       f"| {_s(s['taskomatic_cpu_s_per_1k'], 3):>12} | {_s(s['postgres_cpu_s_per_1k'], 3):>11} "
                       f"| {_s(s['key_claims_per_1k'], 1):>13} | {_s(s['db_transactions_per_task'], 1):>9} "
                       f"| {_s(s['longest_pause_s']):>7} "
                       f"| {share:<18} | {s['other_share_max']:>10.0%} "
                       f"| {'ok' if s['ok'] else 'FAILED'}")
        out.append("(SA: the standalone instance. CPU from the burst to the last end. Key claims: tokens handed out "
                   "(claims and takeovers). xact/task: database transactions "
                   "(commits and rollbacks, pg_stat_database, the bench's few included) per task. Pause s: the longest "
                   "time no task ran on any instance although tasks were queued. "
                   "Other load: CPU of every other process on the machine during the run, "
                   "as a share of all cores; a large share means the figures are disturbed)")
    return "\n".join(out)


def plot_scaling(results: dict[str, Any], path: Path) -> Path | None:
    """Throughput and database transactions per task over the scaling setups, as a PNG; None without data."""
    scaling = results.get("scaling")
    if not scaling or not scaling.get("summary"):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [s for s in scaling["summary"] if s.get("throughput_tps")]
    if not rows:
        return None
    labels = [s["setup"] for s in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [s["throughput_tps"] for s in rows], color=["#888" if s["mode"] == "standalone" else "#3a7"
                                                                  for s in rows])
    left.set_ylabel("no-op tasks/s (median of runs)")
    left.set_title("throughput: standalone vs multihost instances")
    right.bar(labels, [s.get("db_transactions_per_task") or 0 for s in rows], color="#37a")
    right.set_ylabel("database transactions per task")
    right.set_title("what coordination costs")
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"{scaling['workload']['description']}, {scaling['shards_per_instance']} shards per instance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multihost", description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="suite", action="store_const", const="quick",
                       help="3 takeovers; 5,000 no-op tasks over 500 keys per scaling run (default)")
    which.add_argument("--full", dest="suite", action="store_const", const="full",
                       help="10 takeovers; 20,000 no-op tasks over 500 keys, 3 runs per scaling setup")
    which.add_argument("--smoke", dest="suite", action="store_const", const="smoke",
                       help="a tiny run for CI (a 3 s lease, so its takeover figures are not the defaults')")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument("--out", type=Path, help="the JSON file (or a directory for multihost-<stamp>.json); "
                                                 "default bench/results/multihost-<stamp>.json")
    parser.add_argument("--only", choices=["takeover", "scaling"], help="run one of the two measurements")
    parser.add_argument("--instances", type=int, choices=[2, 3], help="instances in the takeover runs (default 2)")
    parser.add_argument("--repeats", type=int, help="takeover repetitions (default: quick 3, full 10)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="a daemon setting for every instance (as taskomatic --set); the figures are then "
                             "not those of the defaults, and the output says so")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the /tmp work directory (daemon logs)")
    parser.set_defaults(suite="quick")
    args = parser.parse_args(argv)
    plan = plan_for(args.suite)
    if args.instances:
        plan = plan.with_instances(args.instances)
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        plan = Plan(**{**asdict(plan), "takeover_repeats": args.repeats})
    if args.set:
        from taskomatic import config as config_mod

        try:
            config_mod.parse_overrides(args.set)
            resolved_settings([*plan.settings, *args.set])
        except config_mod.ConfigError as exc:
            parser.error(str(exc))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        results = run_all(args, plan)
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted; everything the bench started is stopped", file=sys.stderr)
        return 130
    path = results_path(args.out, stamp)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(render_summary(results))
    print(f"\nwrote {path}")
    plot = plot_scaling(results, path.with_suffix(".png"))
    if plot is not None:
        print(f"wrote {plot}")
    if not results["ok"]:
        print("checks failed (see the JSON: runs[].checks, runs[].error)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
