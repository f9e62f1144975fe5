"""Installed as a service: no silent database, upgrades that stop instead of looping.

Real PostgreSQL, the daemon and the CLI as subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

from taskomatic.db import migrate
from taskomatic.exitcodes import EXIT_CONFIG, EXIT_SCHEMA
from tests.helpers import REPO, Daemon, query, wait_for


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("TASKOMATIC_") and k not in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY")}
    return subprocess.run([sys.executable, "-m", "taskomatic", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO),
                          env={**base, "PYTHONPATH": str(REPO), **(env or {})}, check=False)


def packaged_like_config(tmp_path: Path) -> Path:
    """A config with the dsn line commented out, as the package installs it."""
    conf = tmp_path / "taskomatic.conf"
    conf.write_text("# taskomatic\n\n[database]\n\n# libpq connection string\n#dsn =\n\n[daemon]\n#shards = 4\n")
    return conf


# -- no silent database ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["db", "upgrade"], ["submit", "start_vm", "--vm", "1"]],
                         ids=["daemon", "db-upgrade", "submit"])
def test_no_dsn_is_refused_saying_what_to_write_where(tmp_path: Path, command: list[str]) -> None:
    conf = packaged_like_config(tmp_path)
    result = run_cli("--config", str(conf), "--state-dir", str(tmp_path / "state"), *command, timeout=30)
    assert result.returncode == EXIT_CONFIG, result.stderr
    err = result.stderr
    assert f"{conf}:6" in err, err  # the commented-out dsn line
    assert "dsn = " in err and "[database]" in err and "TASKOMATIC_DSN" in err and "--embedded-db" in err
    assert len([line for line in err.splitlines() if "no database configured" in line]) == 1, err
    assert not (tmp_path / "state").exists(), "a private PostgreSQL was initialised without being asked for"


@pytest.mark.parametrize(("command", "code"), [(["status"], 3), (["tasks"], 4), (["instances"], 4),
                                               (["show", "1"], 4)])
def test_read_only_commands_never_start_the_private_server(tmp_path: Path, command: list[str], code: int) -> None:
    state = tmp_path / "state"
    result = run_cli("--embedded-db", "--state-dir", str(state), *command, timeout=30)
    assert result.returncode == code, result.stderr
    assert "is not running" in result.stderr and "--embedded-db" in result.stderr
    assert not (state / "postgres").exists(), "a read-only command initialised a server"


def test_embedded_db_and_dsn_together_are_refused(tmp_path: Path) -> None:
    result = run_cli("--embedded-db", "--dsn", "dbname=x", "status", timeout=30)
    assert result.returncode == EXIT_CONFIG and "give one" in result.stderr


def test_a_drop_in_sets_the_dsn_and_a_bad_drop_in_line_is_named(tmp_path: Path, empty_dsn: str) -> None:
    conf = packaged_like_config(tmp_path)
    dropins = Path(f"{conf}.d")
    dropins.mkdir()
    (dropins / "50-database.conf").write_text(f"[database]\ndsn = {empty_dsn}\n")
    (dropins / "README").write_text("not a .conf file: ignored\n")
    result = run_cli("--config", str(conf), "db", "upgrade", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "applied: 0001_initial" in result.stdout
    # Read in name order: the later file wins, and a bad line in it names file and line.
    later = dropins / "90-local.conf"
    later.write_text("[daemon]\nshards = 2\nshardz = 3\n")
    result = run_cli("--config", str(conf), "status", timeout=30)
    assert result.returncode == EXIT_CONFIG
    assert f"{later}:3" in result.stderr and "did you mean 'shards'" in result.stderr


# -- upgrades ----------------------------------------------------------------------------------------


def test_an_out_of_date_schema_exits_8_with_one_line_naming_the_command(
        empty_dsn: str, state_dir: Path) -> None:
    conn = psycopg2.connect(empty_dsn)
    migrate.upgrade(conn, through=1)
    conn.close()
    daemon = Daemon(empty_dsn, state_dir, shards=1)
    try:
        code = daemon.wait(60)
        log = daemon.log()
        assert code == EXIT_SCHEMA, log
        lines = [line for line in log.splitlines() if "out of date" in line]
        assert len(lines) == 1 and "taskomatic db upgrade" in lines[0] and "auto_migrate" in lines[0], log
        assert "Traceback" not in log
    finally:
        daemon.stop()
    # Nothing was changed: the operator decides when to upgrade.
    assert query(empty_dsn, "SELECT max(version) AS v FROM schema_migrations")[0]["v"] == 1


def test_auto_migrate_upgrades_at_start(empty_dsn: str, state_dir: Path) -> None:
    conn = psycopg2.connect(empty_dsn)
    migrate.upgrade(conn, through=1)
    conn.close()
    daemon = Daemon(empty_dsn, state_dir, shards=1, extra=["--set", "auto_migrate=yes"])
    try:
        daemon.wait_ready()
        assert "auto_migrate: applied 0002_" in daemon.log()
    finally:
        daemon.stop()
    versions = [r["version"] for r in query(empty_dsn, "SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in migrate.available_migrations()]


@pytest.fixture
def first_schema_dsn(empty_dsn: str) -> Iterator[str]:
    """A database at the first migration only: an old installation."""
    conn = psycopg2.connect(empty_dsn)
    migrate.upgrade(conn, through=1)
    conn.close()
    yield empty_dsn


def test_upgrade_from_the_first_migration_loses_no_task(
        first_schema_dsn: str, libvirt_nodes: list[object], state_dir: Path) -> None:
    dsn = first_schema_dsn
    for i, node in enumerate(libvirt_nodes):
        query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                   "VALUES (%s, %s, 'TEST', 64, 268435456)", (f"node{i}", node.test_uri))  # type: ignore[attr-defined]
    vms = [query(dsn, "INSERT INTO vms (description, memory_allocated) VALUES (%s, 65536) RETURNING id",
                 (f"up-{dsn[-12:]}-{i}",))[0]["id"] for i in range(3)]
    # The old version's instance died with one task running and others queued behind it.
    old = query(dsn, "INSERT INTO instances (hostname, pid, version, mode, shards, heartbeat_at) "
                     "VALUES ('old-host', 1, '0.old', 'standalone', 2, now() - interval '1 hour') "
                     "RETURNING id")[0]["id"]
    running = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', %s, "
                         "'create_vm') RETURNING id", (vms[0],))[0]["id"]
    query(dsn, "UPDATE tasks SET state = 'running', claimed_by = %s, claimed_at = now(), attempts = 1, "
               "time_started = now() WHERE id = %s", (old, running))
    query(dsn, "UPDATE vms SET state = 'creating' WHERE id = %s", (vms[0],))
    for vm in vms:
        for action in (("start_vm",) if vm == vms[0] else ("create_vm", "start_vm")):
            query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, args) "
                       "VALUES ('Vm', %s, %s, '{}')", (vm, action))
    before = query(dsn, "SELECT id, action, task_target_id, args, created_at FROM tasks ORDER BY id")

    result = run_cli("db", "upgrade", "--dsn", dsn, timeout=120)
    assert result.returncode == 0, result.stderr
    last = migrate.available_migrations()[-1]
    assert f"applied: {last.version:04d}_{last.name}" in result.stdout
    after = query(dsn, "SELECT id, action, task_target_id, args, created_at FROM tasks ORDER BY id")
    assert after == before, "the upgrade changed or lost task rows"

    daemon = Daemon(dsn, state_dir, shards=2)
    try:
        daemon.wait_ready()
        wait_for(lambda: not query(dsn, "SELECT 1 FROM tasks WHERE state IN ('queued', 'running')"), 90,
                 what="every task to end")
    finally:
        daemon.stop()
    rows = query(dsn, "SELECT id, action, state, message FROM tasks ORDER BY id")
    assert [r["id"] for r in rows] == [r["id"] for r in before], "a task was lost or added"
    assert all(r["state"] == "finished" for r in rows), rows
    states = {r["id"]: r["state"] for r in query(dsn, "SELECT id, state FROM vms")}
    assert set(states.values()) == {"running"}, states


def test_status_json_is_one_document_with_iso_times_and_numbers(
        dsn: str, daemon_factory: Callable[..., Daemon]) -> None:
    result = run_cli("status", "--json", "--dsn", dsn, timeout=30)
    assert result.returncode == 3, result.stderr  # no live instance
    report = json.loads(result.stdout)
    assert report["instances"] == []
    daemon_factory(shards=1)
    result = run_cli("status", "--json", "--dsn", dsn, timeout=30)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    instance = report["instances"][0]
    assert isinstance(instance["heartbeat_age"], float) and isinstance(instance["shards"], int)
    assert instance["started_at"].endswith("+00:00") and "T" in instance["started_at"]


def test_the_private_server_is_an_explicit_choice_that_read_only_commands_then_use(state_dir: Path) -> None:
    # dsn = embedded (what --embedded-db sets): the daemon starts its own PostgreSQL under the state dir.
    daemon = Daemon("embedded", state_dir, shards=1)
    try:
        daemon.wait_ready(120)
        assert (state_dir / "postgres" / "pgdata" / "PG_VERSION").exists()
        result = run_cli("status", "--json", "--embedded-db", "--state-dir", str(state_dir), timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["live"] is True
    finally:
        daemon.stop()
