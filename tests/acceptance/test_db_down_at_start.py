"""The daemon started while its database is down waits for it, then starts normally.

Waiting is right at start: systemd often starts taskomatic before PostgreSQL
or the network. The supervisor retries with exponential backoff capped by
``database.startup_retry_max``, says each attempt and the next delay in the
log and in systemd's STATUS (sd_notify), keeps the unit's start timeout at
bay (EXTEND_TIMEOUT_USEC), sends no READY=1 while waiting, and once the
database answers it becomes READY and runs tasks. A stop request during the
wait ends it at once.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from taskomatic.exitcodes import EXIT_DATABASE_REFUSED
from tests.acceptance.test_sd_notify import NotifySocket
from tests.conftest import _private_dir
from tests.helpers import REPO, query, wait_for


class DaemonWithNotify:
    """The real daemon in its own process group, with a stand-in for systemd's notify socket."""

    def __init__(self, dsn: str, state_dir: Path, *settings: str) -> None:
        self.log_path = state_dir / "daemon.log"
        self.notify = NotifySocket(str(state_dir / "notify"))
        cmd = [sys.executable, "-m", "taskomatic", "--dsn", dsn, "--shards", "2",
               "--set", f"state_dir={state_dir}", "--set", "poll_interval=0.5"]
        for setting in settings:
            cmd += ["--set", setting]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO),
                env={**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(state_dir / "notify"),
                 "TMPDIR": str(state_dir)})  # its temporary files go with state_dir (tests.helpers.Daemon)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self.notify.close()


@pytest.fixture
def stopped_server() -> Iterator[Any]:
    """A private PostgreSQL of our own with the current schema, stopped (ours to start)."""
    from taskomatic.db import migrate
    from taskomatic.embedded.postgres import EmbeddedPostgres

    base = _private_dir("tkm-pgdown-")
    server = EmbeddedPostgres(base)
    try:
        server.start()
        conn = psycopg2.connect(server.dsn)
        migrate.upgrade(conn)
        conn.close()
        server.stop()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_waits_for_the_database_then_starts_and_runs_a_task(stopped_server: Any, state_dir: Path,
                                                           libvirt_nodes: list[Any]) -> None:
    server = stopped_server
    daemon = DaemonWithNotify(server.dsn, state_dir, "connect_timeout=1", "startup_retry_max=2")
    try:
        # Attempts 1, 2, 3...: delays 1 s, 2 s, then capped at 2 s; each logged with the next delay.
        wait_for(lambda: "waiting for the database (attempt 3)" in daemon.log(), 60,
                 what="three logged connection attempts")
        assert daemon.process.poll() is None, daemon.log()
        lines = re.findall(r"waiting for the database \(attempt (\d+)\): (.*); retry in (\S+) s", daemon.log())
        assert [(int(n), float(d)) for n, _, d in lines[:3]] == [(1, 1.0), (2, 2.0), (3, 2.0)], lines
        assert all("cannot connect to the database" in reason for _, reason, _ in lines), lines
        status = wait_for(lambda: daemon.notify.lines("STATUS=waiting for the database: "), 30,
                          what="a STATUS line while waiting")
        assert re.search(r"; retry in \d+ s$", status[-1]), status
        assert "cannot connect to the database" in status[-1]
        assert daemon.notify.lines("EXTEND_TIMEOUT_USEC="), "the start timeout must be extended while waiting"
        assert not daemon.notify.lines("READY=1"), "READY=1 before the database answered"
        assert "Traceback" not in daemon.log()

        server.start()
        # Not tied to the old timestamps: the next attempt (at most 2 s + 1 s away) gets through.
        wait_for(lambda: daemon.notify.lines("READY=1"), 60, what="READY=1 once the database is up")
        assert "the database answered after" in daemon.log()
        instance = query(server.dsn, "SELECT pid, stopped_at FROM instances")
        assert [(r["pid"], r["stopped_at"]) for r in instance] == [(daemon.process.pid, None)]

        host = query(server.dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                                 "VALUES ('node0', %s, 'TEST', 8, 8388608) RETURNING id",
                     (libvirt_nodes[0].test_uri,))[0]["id"]
        assert host
        vm = query(server.dsn, "INSERT INTO vms (description, memory_allocated) VALUES ('dbdown-vm', 65536) "
                               "RETURNING id")[0]["id"]
        task = query(server.dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) "
                                 "VALUES ('Vm', %s, 'create_vm') RETURNING id", (vm,))[0]["id"]

        def ended() -> dict[str, Any] | None:
            row = query(server.dsn, "SELECT state, message FROM tasks WHERE id = %s", (task,))[0]
            return row if row["state"] in ("finished", "failed") else None

        row = wait_for(ended, 60, what="the task to end")
        assert row["state"] == "finished", (row, daemon.log()[-3000:])
        assert query(server.dsn, "SELECT state FROM vms WHERE id = %s", (vm,))[0]["state"] == "stopped"
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log()


@pytest.mark.slow
def test_a_stop_while_waiting_ends_the_daemon_at_once(state_dir: Path) -> None:
    nowhere = state_dir / "no-such-socket-dir"
    daemon = DaemonWithNotify(f"host={nowhere} dbname=taskomatic user=taskomatic", state_dir,
                              "connect_timeout=1", "startup_retry_max=30")
    try:
        wait_for(lambda: "waiting for the database (attempt 4)" in daemon.log(), 60,
                 what="four attempts (the delay is 8 s after the fourth)")
        asked = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        code = daemon.process.wait(10)
        assert code == 0, daemon.log()
        assert time.monotonic() - asked < 5, "a stop must not wait out the backoff"
        assert "stopped while waiting for the database" in daemon.log()
        assert not daemon.notify.lines("READY=1")
    finally:
        daemon.stop()


def test_a_refusal_waiting_cannot_cure_exits_9_at_once(pg_server: Any, state_dir: Path) -> None:
    dsn = pg_server.dsn.replace("dbname=taskomatic", "dbname=no_such_database_here")
    daemon = DaemonWithNotify(dsn, state_dir, "connect_timeout=1")
    try:
        code = daemon.process.wait(30)
        log = daemon.log()
        assert code == EXIT_DATABASE_REFUSED, log
        assert 'database "no_such_database_here" does not exist' in log and "not retried" in log
        refusal = [line for line in log.splitlines() if "not retried" in line]
        assert len(refusal) == 1 and "pg_hba.conf" in refusal[0], log
        assert "waiting for the database" not in log
        assert "Traceback" not in log
    finally:
        daemon.stop()
