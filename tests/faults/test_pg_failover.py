"""Fault: PostgreSQL failover, a streaming replica promoted while the daemon runs (issue 19).

The test runs a primary and a synchronous streaming replica of its own (two
EmbeddedPostgres servers; the replica made with ``pg_basebackup -R``, the primary
told ``synchronous_standby_names = '*'``, so a commit the daemon saw is on the
replica). The daemons, and the test itself, reach the database through one
multi-host DSN, ``host=<primary>,<replica> target_session_attrs=read-write``: after
the failover libpq finds the new primary by itself.

At the seed's moment the primary is stopped (fast shutdown, or kill -9 of its
process group, as the seed decides) and the replica promoted (``pg_promote()``).
One standalone instance (3 shards) or two multihost ones (2 shards each).

Verdict: no task lost or repeated (every task finishes; re-runs only after a
"not started" settlement), per-key order, rows agree with the nodes, fencing held
(the checker's rules), and new work finishes on the new primary.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from tests.faults.harness import FaultRun
from tests.faults.test_faults import start_some, verdict
from tests.helpers import wait_for


class Pair:
    """A primary and its synchronous streaming replica; ``dsn`` names both (read-write wins)."""

    def __init__(self, base: Path) -> None:
        from taskomatic.embedded.postgres import EmbeddedPostgres

        self.primary = EmbeddedPostgres(base / "a")
        self.replica = EmbeddedPostgres(base / "b")
        self.dsn = ""

    def start(self) -> None:
        from taskomatic.db import migrate
        from taskomatic.embedded.postgres import SUPERUSER

        self.primary.start()
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(self.primary, f"CREATE DATABASE {name}")
        single = self.primary.dsn.replace("dbname=taskomatic", f"dbname={name}")
        conn = psycopg2.connect(single)
        migrate.upgrade(conn)
        conn.close()
        self._base_backup()
        self.replica.start()
        # Synchronous only once the replica streams (before, every commit would wait for it).
        wait_for(lambda: self._scalar(self.primary, "SELECT count(*) FROM pg_stat_replication "
                                                    "WHERE state = 'streaming'"), 60, 0.1, "the replica to stream")
        self._admin(self.primary, "ALTER SYSTEM SET synchronous_standby_names = '*'")
        self._admin(self.primary, "SELECT pg_reload_conf()")
        wait_for(lambda: self._scalar(self.primary, "SELECT count(*) FROM pg_stat_replication "
                                                    "WHERE sync_state = 'sync'"), 60, 0.1, "a synchronous replica")
        sockets = f"{self.primary.socket_dir},{self.replica.socket_dir}"
        self.dsn = (f"host={sockets} port={self.primary.port} dbname={name} user={SUPERUSER} "
                    "target_session_attrs=read-write connect_timeout=5")

    def _base_backup(self) -> None:
        from taskomatic.embedded.postgres import SUPERUSER

        self.replica._prepare_dirs()  # the data directory, empty, owned by the run-as user
        tool = str(Path(self.primary.binaries.postgres).resolve().with_name("pg_basebackup"))
        subprocess.run([tool, "-D", str(self.replica.data_dir), "-R", "-X", "stream", "-c", "fast",
                        "-h", str(self.primary.socket_dir), "-p", str(self.primary.port), "-U", SUPERUSER,
                        "-d", "application_name=replica"],
                       check=True, capture_output=True, user=self.primary.user, env={"PATH": os.environ["PATH"]})

    def fail_over(self, kill: bool) -> None:
        """Stop the primary (kill -9 of its process group, or a fast shutdown), promote the replica."""
        if kill and self.primary.pid is not None:
            os.killpg(self.primary.pid, signal.SIGKILL)  # our own server's group
        self.primary.stop()
        self._admin(self.replica, "SELECT pg_promote(true, 60)")
        wait_for(lambda: not self._scalar(self.replica, "SELECT pg_is_in_recovery()"), 60, 0.1,
                 "the replica to be promoted")

    def close(self) -> None:
        self.replica.stop()
        self.primary.stop()

    @staticmethod
    def _admin(server: Any, sql: str) -> None:
        conn = psycopg2.connect(server.dsn.replace("dbname=taskomatic", "dbname=postgres"))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    @staticmethod
    def _scalar(server: Any, sql: str) -> Any:
        conn = psycopg2.connect(server.dsn.replace("dbname=taskomatic", "dbname=postgres"))
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchone()[0]
        finally:
            conn.close()


@pytest.fixture
def pg_pair() -> Iterator[Pair]:
    base = Path(tempfile.mkdtemp(prefix="tkm-fpf-", dir="/tmp"))
    base.chmod(0o755)
    pair = Pair(base)
    tool = Path(pair.primary.binaries.postgres).resolve().with_name("pg_basebackup")
    if not tool.exists():
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"{tool} not found (PostgreSQL's client tools)")
    try:
        pair.start()
        yield pair
    finally:
        pair.close()  # stopping a server that never started is a no-op
        shutil.rmtree(base, ignore_errors=True)


# pg_pair first: torn down last, after the daemons stopped.
def test_pg_failover(seed: int, pg_pair: Pair, make_run: Any) -> None:
    run: FaultRun = make_run("pg_failover", seed, pg_pair.dsn)
    run.add_hosts()
    start_some(run)
    scripts = run.workload()
    run.wait_ended(run.moment)
    kill = run.rng.random() < 0.5
    pg_pair.fail_over(kill)
    run.notes["primary"] = "killed" if kill else "stopped"
    verdict(run.finish(scripts, must_finish=True))
