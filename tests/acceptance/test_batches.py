"""Quick tasks start in batches, and a crash in the middle of one loses nothing.

The daemon runs the benchmark's ``noop`` action (bench/plugin, found through
its entry point as any installed plugin would be): nothing but the pipeline
itself, so its shards learn at once that the action is quick and start it
in batches of different keys.
"""

from __future__ import annotations

import signal

import pytest

from tests.acceptance import checks
from tests.helpers import query, wait_for

# Slow (not in the inner loop): daemons under batch load and a shard killed mid-batch.
pytestmark = pytest.mark.slow

SHARDS = 2


def queue_noops(dsn: str, tasks: int, keys: int) -> None:
    query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
               "SELECT 'Vm', 1 + g %% %s, 'noop' FROM generate_series(1, %s) g", (keys, tasks))


def commits(dsn: str) -> int:
    return int(query(dsn, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")[0]
               ["xact_commit"])


def test_quick_tasks_share_commits_and_keep_order(dsn, noop_daemon):
    tasks = 4000
    before = commits(dsn)
    queue_noops(dsn, tasks, keys=200)
    daemon = noop_daemon()
    checks.wait_all_ended(dsn, daemon, timeout=120)
    daemon.stop()  # its sessions end, so the server has counted their commits
    checks.assert_all_ended_once(dsn, single_attempt=True)
    checks.assert_key_order(dsn)
    assert checks.counts(dsn) == {"finished": tasks}
    # One commit per task (or two) would be >= 4000; batches of different keys share them.
    spent = commits(dsn) - before
    assert spent < tasks // 4, f"{spent} commits for {tasks} quick tasks: they were not started in batches"


def test_a_shard_killed_mid_batch_loses_and_repeats_nothing(dsn, noop_daemon):
    tasks = 30000
    queue_noops(dsn, tasks, keys=300)
    daemon = noop_daemon()
    wait_for(lambda: checks.counts(dsn).get("finished", 0) >= 2000, 60, 0.01, what="the shards to get going")
    slot, old_pid, row = checks.kill_shard_mid_task(daemon, dsn, SHARDS)
    # Everything the killed shard had committed running, and not ended, is settled once.
    interrupted = {r["id"] for r in query(dsn, "SELECT id FROM tasks WHERE state = 'running' "
                                               "AND run_by_shard = %s", (slot,))}
    assert row["id"] in interrupted
    checks.wait_slot_respawned(daemon, slot, old_pid)
    checks.wait_all_ended(dsn, daemon, timeout=180)
    checks.assert_all_ended_once(dsn)
    checks.assert_key_order(dsn)
    assert checks.counts(dsn) == {"finished": tasks}
    reconciled = {int(line.split("task ", 1)[1].split()[0]) for line in daemon.log().splitlines()
                  if ") reconciled: " in line}
    assert interrupted <= reconciled, f"not settled by reconciliation: {sorted(interrupted - reconciled)[:10]}"
    assert daemon.process.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
