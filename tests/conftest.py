"""Real PostgreSQL and real libvirt nodes for the integration and acceptance suites.

One private PostgreSQL per test session; each test gets its own database,
copied from a migrated template (fast, and no test sees another's rows).
Two libvirtd nodes (libvirt's test driver behind a real daemon) per session.
Everything started here is stopped in finalizers, also when tests fail.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from tests.helpers import Daemon

TEMPLATE_DB = "taskomatic_template"


def _private_dir(prefix: str) -> Path:
    # Under /tmp with mode 0755: the unprivileged server users must reach it
    # (pytest's tmp_path may sit under a directory they cannot enter).
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    from taskomatic.embedded.postgres import EmbeddedPostgres

    base = _private_dir("tkm-pg-")
    server = EmbeddedPostgres(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _server_dsn(server: object, dbname: str) -> str:
    dsn: str = server.dsn  # type: ignore[attr-defined]
    return dsn.replace("dbname=taskomatic", f"dbname={dbname}")


@pytest.fixture(scope="session")
def template_db(pg_server: object) -> str:
    from taskomatic.db import migrate

    admin = psycopg2.connect(_server_dsn(pg_server, "postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        cur.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    admin.close()
    conn = psycopg2.connect(_server_dsn(pg_server, TEMPLATE_DB))
    migrate.upgrade(conn)
    conn.close()
    return TEMPLATE_DB


@pytest.fixture
def empty_dsn(pg_server: object) -> Iterator[str]:
    """A fresh database with no schema at all."""
    yield from _fresh_database(pg_server, template=None)


@pytest.fixture
def dsn(pg_server: object, template_db: str) -> Iterator[str]:
    """A fresh database with the current schema."""
    yield from _fresh_database(pg_server, template=template_db)


def _fresh_database(server: object, template: str | None) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(_server_dsn(server, "postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    try:
        yield _server_dsn(server, name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture(scope="session")
def libvirt_nodes() -> Iterator[list[object]]:
    from taskomatic.embedded.libvirtd import ManagedNode

    base = _private_dir("tkm-nodes-")
    nodes = [ManagedNode(base, f"node{i}") for i in range(2)]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def hosts(dsn: str, libvirt_nodes: list[object]) -> list[int]:
    """One `hosts` row per libvirt node (test driver), in this test's database."""
    ids = []
    for i, node in enumerate(libvirt_nodes):
        rows = execute_returning(
            dsn,
            "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
            "VALUES (%s, %s, 'TEST', 64, 268435456) RETURNING id",
            (f"node{i}", node.test_uri),  # type: ignore[attr-defined]
        )
        ids.append(rows)
    return ids


def execute_returning(dsn: str, sql: str, params: object) -> int:
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute(sql, params)
        value = cur.fetchone()[0]  # type: ignore[index]
    conn.commit()
    conn.close()
    return int(value)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = _private_dir("tkm-state-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon_factory(dsn: str, state_dir: Path) -> Iterator[object]:
    """start(shards=N, extra=[...]) -> a running Daemon; all are stopped at the end."""
    started: list[Daemon] = []

    def start(shards: int = 4, extra: list[str] | None = None, wait_ready: bool = True,
              db: str | None = None) -> Daemon:
        daemon = Daemon(db or dsn, state_dir / f"d{len(started)}", shards=shards, extra=extra)
        started.append(daemon)
        if wait_ready:
            daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


