"""Helpers shared by the test suites: waiting on conditions, running the daemon."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import psycopg2.extras

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def query(dsn: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(sql, params)
            rows = [dict(r) for r in cur.fetchall()] if cur.description else []
        conn.commit()
        return rows
    finally:
        conn.close()


def wait_fork_server_dir(tmp_dir: Path) -> list[str]:
    """The fork server's socket directory (multiprocess's ``pymp-*``) in a daemon's own TMPDIR, once it
    is there: where a daemon's temporary files go when its starter gives it a TMPDIR."""
    return wait_for(lambda: [p.name for p in tmp_dir.iterdir() if p.name.startswith("pymp-")], 10,
                    what=f"the fork server's directory under {tmp_dir}")


def sigkill_then_stop(started: Any, when_ready: Callable[[], None] | None = None) -> None:
    """A daemon (``Daemon``, or a bench ``Runner``) whose process group is SIGKILLed once its fork server
    made its directory in the daemon's own TMPDIR: the killed daemon leaves it there, and ``stop()``
    removes it all the same. ``when_ready``: more checks once it is ready (before the kill)."""
    tmp = Path(started.tmp_dir)
    try:
        started.wait_ready()
        if when_ready is not None:
            when_ready()
        assert wait_fork_server_dir(tmp)
        os.killpg(started.pid, signal.SIGKILL)  # no exit handler runs
        started.process.wait(10)
        assert any(tmp.iterdir())  # what the killed daemon could not remove
    finally:
        started.stop()
    assert not tmp.exists()


def execute(dsn: str, sql: str, params: Any = None) -> None:
    query(dsn, sql, params)


class Daemon:
    """The real daemon as a subprocess in its own process group."""

    def __init__(self, dsn: str, state_dir: Path, shards: int = 4, extra: list[str] | None = None,
                 log_path: Path | None = None, python_path: list[str] | None = None) -> None:
        self.log_path = log_path or state_dir / "daemon.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "taskomatic", "--dsn", dsn, "--shards", str(shards),
               "--set", f"state_dir={state_dir}", "--set", "poll_interval=0.5", *(extra or [])]
        # The daemon's temporary files (multiprocess's fork-server socket directories, /tmp/pymp-*) go
        # to a directory of its own, removed in stop(): a daemon whose group has to be SIGKILLed cannot
        # clean up after itself. Short, under /tmp: AF_UNIX paths are limited to 108 bytes.
        self.tmp_dir = tempfile.mkdtemp(prefix="tkd-", dir="/tmp")
        os.chmod(self.tmp_dir, 0o1777)  # like /tmp: an embedded server's unprivileged user may need it too
        # python_path: more import roots, e.g. a plugin's dist-info directory (bench/plugin).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *(python_path or [])]),
               "TMPDIR": self.tmp_dir}
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        cwd=str(REPO), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            return "ready: fetcher and" in self.log()

        wait_for(ready, timeout, 0.1, "the daemon to be ready")

    def child_pids(self) -> dict[str, int]:
        """Process titles of the daemon's children: {'fetcher': pid, 'shard 0': pid, ...}.

        By session, not parent: with child_start = forkserver the children are the fork server's.
        """
        out = subprocess.run(["ps", "-o", "pid=,args=", "--sid", str(self.pid)], capture_output=True,
                             text=True, check=False).stdout
        found = {}
        for line in out.splitlines():
            pid, _, title = line.strip().partition(" ")
            if "taskomatic: fetcher" in title:
                found["fetcher"] = int(pid)
            elif "taskomatic: shard" in title:
                slot = title.split("taskomatic: shard", 1)[1].strip().split("/")[0]
                found[f"shard {slot}"] = int(pid)
        return found

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Make sure nothing of this daemon survives (the whole process group)."""
        if self.process.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.process.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(10)
        self._log.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def history_then_backlog(store: Any, instance_id: int, history: int = 20000, backlog: int = 5000) -> None:
    """A table whose statistics know only finished history: ``history`` finished rows analysed, then a
    ``backlog`` of queued tasks the statistics have not seen (autovacuum off, so they stay so).

    What a long-lived fleet's table looks like between two analyses: the plans of the hot statements
    must still reach tasks by their ids (tests/integration/test_history.py, test_prepared.py).
    """
    with store.conn.cursor() as cur:
        cur.execute("ALTER TABLE tasks SET (autovacuum_enabled = false)")
        cur.execute("""INSERT INTO tasks (task_target_type, task_target_id, action, state, claimed_by,
                                          time_started, time_ended, submitted_by)
                       SELECT 'Vm', 1000 + g %% 200, 'noop', 'finished', %s, now(), now(), 'history'
                       FROM generate_series(1, %s) g""", (instance_id, history))
    store.commit()
    store.conn.autocommit = True
    with store.conn.cursor() as cur:
        cur.execute("ANALYZE tasks")
    store.conn.autocommit = False
    with store.conn.cursor() as cur:
        cur.execute("""INSERT INTO tasks (task_target_type, task_target_id, action, submitted_by)
                       SELECT 'Vm', g %% 100, 'noop', 'backlog' FROM generate_series(1, %s) g""", (backlog,))
    store.commit()
