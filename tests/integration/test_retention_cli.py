"""Retention from the command line and from the daemon, on a real PostgreSQL.

``taskomatic db prune [--dry-run]``, ``taskomatic tasks --archive``,
``taskomatic show`` of an archived task, bad [retention] settings, and the
daemon's own periodic pass (the reconciler process runs it).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import execute, query, wait_for
from tests.integration.test_cli import Cli, assert_clean_failure, ok, run_cli


@pytest.fixture
def cli(dsn: str) -> Cli:
    """cli(args...) on this test's migrated database."""
    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--dsn", dsn, timeout=timeout)

    return run

OLD_TASKS_SQL = """
INSERT INTO tasks (task_target_type, task_target_id, action, state, message, created_at, time_started,
                   time_ended, submitted_by)
SELECT 'Vm', g, 'start_vm', CASE WHEN g %% 2 = 0 THEN 'finished' ELSE 'failed' END,
       CASE WHEN g %% 2 = 1 THEN 'no such domain' END,
       clock_timestamp() - interval '10 days', clock_timestamp() - interval '10 days',
       clock_timestamp() - interval '9 days', 'old'
FROM generate_series(1, %(n)s) g
"""


def _old_tasks(dsn: str, n: int) -> list[int]:
    execute(dsn, OLD_TASKS_SQL, {"n": n})
    return [r["id"] for r in query(dsn, "SELECT id FROM tasks WHERE submitted_by = 'old' ORDER BY id")]


def test_db_prune_dry_run_counts_then_prune_archives(dsn: str, cli: Cli) -> None:
    old = _old_tasks(dsn, 5)
    execute(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, created_at) "
                 "VALUES ('Vm', 99, 'start_vm', clock_timestamp() - interval '30 days')")

    counted = json.loads(ok(cli("db", "prune", "--dry-run", "--json")))
    assert counted["would_archive"] == 5 and counted["held_back_by_children"] == 0
    assert query(dsn, "SELECT count(*) AS n FROM tasks_archive")[0]["n"] == 0

    out = ok(cli("db", "prune"))
    assert "archived: 5" in out
    assert [r["id"] for r in query(dsn, "SELECT id FROM tasks_archive ORDER BY id")] == old
    assert [r["state"] for r in query(dsn, "SELECT state FROM tasks")] == ["queued"]  # 30 days old, not ended

    listed = json.loads(ok(cli("tasks", "--archive", "--json", "--state", "failed")))
    assert [t["id"] for t in listed] == list(reversed(old[0::2]))  # generate_series' odd rows failed
    assert [t["state"] for t in json.loads(ok(cli("tasks", "--json")))] == ["queued"]

    shown = json.loads(ok(cli("show", str(old[0]), "--json")))
    assert shown["archived"] is True and shown["state"] in ("finished", "failed") and shown["holder"] is None
    assert "(archived)" in ok(cli("show", str(old[0])))


def test_db_prune_without_archive_deletes(dsn: str, cli: Cli) -> None:
    _old_tasks(dsn, 3)
    out = ok(cli("db", "prune", "--set", "retention.archive=no", "--set", "retention.keep_finished=8d"))
    assert "deleted: 3" in out
    assert query(dsn, "SELECT count(*) AS n FROM tasks")[0]["n"] == 0
    assert query(dsn, "SELECT count(*) AS n FROM tasks_archive")[0]["n"] == 0


def test_db_prune_keeps_what_is_younger_than_keep_finished(dsn: str, cli: Cli) -> None:
    _old_tasks(dsn, 3)
    out = ok(cli("db", "prune", "--set", "retention.keep_finished=2w"))
    assert "archived: 0" in out
    assert query(dsn, "SELECT count(*) AS n FROM tasks")[0]["n"] == 3


def test_bad_retention_setting_is_a_configuration_error(dsn: str, cli: Cli) -> None:
    err = assert_clean_failure(cli("db", "prune", "--set", "retention.keep_finished=7 days"), 3)
    assert "keep_finished" in err and "7d" in err


def test_archive_cannot_be_followed(cli: Cli) -> None:
    err = assert_clean_failure(cli("tasks", "--archive", "--follow"), 2)
    assert "--follow" in err


def test_the_daemon_archives_on_its_own(dsn: str, daemon_factory: object) -> None:
    old = _old_tasks(dsn, 4)
    daemon = daemon_factory(shards=1, extra=["--set", "retention.retention_interval=0.2",  # type: ignore[operator]
                                    "--set", "retention.keep_finished=1d"])

    def archived() -> list[int]:
        return [r["id"] for r in query(dsn, "SELECT id FROM tasks_archive ORDER BY id")]

    try:
        wait_for(lambda: archived() == old, timeout=30, what="the daemon to archive the old tasks")
    except AssertionError:
        raise AssertionError(daemon.log_path.read_text()[-3000:]) from None
    assert query(dsn, "SELECT count(*) AS n FROM tasks")[0]["n"] == 0


def test_db_prune_waits_for_a_running_batch(dsn: str) -> None:
    """Another instance's batch holds the retention lock: the command waits for it, then does its work."""
    import psycopg2

    from taskomatic.db.retention import RETENTION_LOCK_ID
    from tests.integration.test_cli import PYTHON, _env

    old = _old_tasks(dsn, 2)
    holder = psycopg2.connect(dsn)
    proc = None
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (RETENTION_LOCK_ID,))
        proc = subprocess.Popen([PYTHON, "-m", "taskomatic", "db", "prune", "--dsn", dsn], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: query(dsn, "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
                                    "AND NOT granted")[0]["n"] == 1, what="db prune to wait for the lock")
        assert proc.poll() is None and query(dsn, "SELECT count(*) AS n FROM tasks_archive")[0]["n"] == 0
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (RETENTION_LOCK_ID,))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "archived: 2" in out
    finally:
        holder.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [r["id"] for r in query(dsn, "SELECT id FROM tasks_archive ORDER BY id")] == old
