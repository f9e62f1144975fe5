"""Fixtures of the fault-injection suite: seeds, private nodes, a restartable PostgreSQL.

Seeds: ``TASKOMATIC_FAULT_SEEDS`` (``1-20``, ``3,7,11`` or ``5``; default ``1``)
parametrizes every fault test, so the seed is in the test id
(``test_shard_killed[seed7]``). Everything started here is stopped in
finalizers, also when a test fails: daemons (whole process groups, thawed
first), libvirt nodes (thawed first), proxies, the private PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from tests.faults.harness import FaultRun


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            seeds.extend(range(int(low), int(high) + 1))
        else:
            seeds.append(int(part))
    return seeds or [1]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        seeds = parse_seeds(os.environ.get("TASKOMATIC_FAULT_SEEDS", "1"))
        metafunc.parametrize("seed", seeds, ids=[f"seed{s}" for s in seeds])


def _private_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture
def fault_nodes() -> Iterator[list[object]]:
    """Two libvirt nodes of this test alone (faults kill, freeze and restart them)."""
    from taskomatic.embedded.libvirtd import ManagedNode

    base = _private_dir("tkm-fn-")
    nodes = [ManagedNode(base, f"n{i}") for i in range(2)]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.thaw()
            node.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def restartable_dsn() -> Iterator[tuple[object, str]]:
    """A PostgreSQL server of this test alone, free to be restarted: (server, dsn)."""
    from taskomatic.db import migrate
    from taskomatic.embedded.postgres import EmbeddedPostgres

    base = _private_dir("tkm-fpg-")
    server = EmbeddedPostgres(base)
    try:
        server.start()
        name = f"t_{uuid.uuid4().hex[:12]}"
        admin = psycopg2.connect(server.dsn.replace("dbname=taskomatic", "dbname=postgres"))
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        admin.close()
        dsn = server.dsn.replace("dbname=taskomatic", f"dbname={name}")
        conn = psycopg2.connect(dsn)
        migrate.upgrade(conn)
        conn.close()
        yield server, dsn
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def make_run(request: pytest.FixtureRequest, fault_nodes: list[object]) -> Iterator[object]:
    """make_run(fault, seed, dsn) -> a FaultRun; everything it started is stopped at the end."""
    runs: list[FaultRun] = []
    base = _private_dir("tkm-fr-")

    def make(fault: str, seed: int, dsn: str) -> FaultRun:
        run = FaultRun(fault, seed, dsn, fault_nodes, base / f"run{len(runs)}")  # type: ignore[arg-type]
        runs.append(run)
        return run

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for run in runs:
        run.close(keep_logs_to=os.environ.get("TKM_KEEP_LOGS") if failed or os.environ.get("TKM_KEEP_LOGS_ALWAYS")
                  else None, test_name=request.node.name)
    shutil.rmtree(base, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
