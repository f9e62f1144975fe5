"""Integration tests for the embedded servers: real PostgreSQL, real libvirtd, real qemu.

Every server a test starts is stopped by a finalizer, also when the test fails.
Synchronisation is by polling a condition with a deadline, never by sleeping.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import psycopg2
import pytest

from taskomatic.embedded.libvirtd import ManagedNode, ManagedNodeError
from taskomatic.embedded.postgres import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    find_pg_binaries,
)

QEMU = "/usr/bin/qemu-system-x86_64"
IS_ROOT = os.geteuid() == 0


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.01)


def proc_state(pid: int) -> str:
    """'alive', 'zombie' or 'gone' (a zombie has exited: only its reaping is due)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
    return "zombie" if state in (b"Z", b"X") else "alive"


def pids_with_cwd(directory: Path) -> list[int]:
    """Live processes working in ``directory`` (every postgres process does, in pgdata)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(os.readlink(f"/proc/{entry}/cwd")) == directory.resolve():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def run_python(code: str, *args: str) -> str:
    """Run ``code`` in a separate Python process (separate libvirt client state)."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def work_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: /tmp/pytest-of-root is mode 0700, so the unprivileged
    # users the servers run as could not reach it.
    path = Path(tempfile.mkdtemp(prefix="tm-emb-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- PostgreSQL -----------------------------------------------------------------


@pytest.fixture
def make_pg(work_dir: Path, request: pytest.FixtureRequest) -> Callable[[], EmbeddedPostgres]:
    """Factory of EmbeddedPostgres on one directory; each one is stopped at teardown."""

    def make() -> EmbeddedPostgres:
        pg = EmbeddedPostgres(work_dir / "pg")
        request.addfinalizer(pg.stop)
        return pg

    return make


def crash(pg: EmbeddedPostgres) -> int:
    """SIGKILL the whole server (postmaster and backends), as a power cut would."""
    pid = pg.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: proc_state(pid) != "alive" and not pids_with_cwd(pg.data_dir))
    return pid


def test_postgres_start_query_reuse_stop(make_pg: Callable[[], EmbeddedPostgres]) -> None:
    pg = make_pg()
    pg.start()
    assert pg.started_by_us
    pid = pg.pid
    assert pid is not None and proc_state(pid) == "alive"
    st = pg.data_dir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    if IS_ROOT:
        assert st.st_uid != 0, "PostgreSQL must not run as root"

    with psycopg2.connect(pg.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
        cur.execute(
            "SELECT current_user, current_database(), current_setting('fsync'),"
            " current_setting('listen_addresses'), current_setting('max_connections')"
        )
        assert cur.fetchone() == ("taskomatic", "taskomatic", "on", "", "200")
    conn.close()

    # A second instance on the same directory reuses the running server...
    other = make_pg()
    other.start()
    assert not other.started_by_us
    assert other.pid == pid
    assert other.dsn == pg.dsn
    # ...and leaves it running when it stops.
    other.stop()
    assert proc_state(pid) == "alive"
    psycopg2.connect(pg.dsn).close()

    pg.stop()
    assert proc_state(pid) == "gone"
    assert pids_with_cwd(pg.data_dir) == [], "backends left behind"
    assert pg.pid is None and not pg.started_by_us
    pg.stop()  # idempotent


@pytest.mark.slow
def test_postgres_starts_over_stale_postmaster_pid(
    make_pg: Callable[[], EmbeddedPostgres],
) -> None:
    pidfile = make_pg().data_dir / "postmaster.pid"

    # 1. The dead postmaster is still a zombie (its parent, us, has not reaped it):
    #    postgres alone would refuse, taking it for a live server.
    first = make_pg()
    first.start()
    old = crash(first)
    assert proc_state(old) == "zombie" and pidfile.exists()
    second = make_pg()
    second.start()
    assert second.started_by_us and second.pid != old
    first.stop()  # reaps the crashed one; must not touch the new server
    psycopg2.connect(second.dsn).close()

    # 2. The pid in postmaster.pid is gone entirely.
    old = crash(second)
    second.stop()
    assert proc_state(old) == "gone" and pidfile.exists()
    third = make_pg()
    third.start()
    psycopg2.connect(third.dsn).close()

    # 3. The pid was reused by an unrelated live process (pid reuse after reboot).
    crash(third)
    third.stop()
    with subprocess.Popen(["sleep", "60"]) as unrelated:
        try:
            lines = pidfile.read_text().splitlines()
            lines[0] = str(unrelated.pid)
            pidfile.write_text("\n".join(lines) + "\n")
            with make_pg() as fourth:
                assert fourth.started_by_us
                with psycopg2.connect(fourth.dsn) as conn, conn.cursor() as cur:
                    cur.execute("SELECT 1")
                conn.close()
            assert proc_state(unrelated.pid) == "alive", "must never signal other processes"
        finally:
            unrelated.kill()


@pytest.mark.slow
def test_postgres_restart_keeps_data(make_pg: Callable[[], EmbeddedPostgres]) -> None:
    pg = make_pg()
    pg.start()
    conn = psycopg2.connect(pg.dsn)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
    conn.close()
    old = pg.pid
    pg.restart()
    assert pg.pid != old and old is not None and proc_state(old) == "gone"
    conn = psycopg2.connect(pg.dsn)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT x FROM t")
        assert cur.fetchone() == (42,)
    conn.close()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run the server as another user")
def test_postgres_unreachable_base_dir_is_a_clear_error() -> None:
    private = Path(tempfile.mkdtemp(prefix="tm-emb-private-"))  # mode 0700, root's
    try:
        with pytest.raises(EmbeddedPostgresError, match="cannot traverse"):
            EmbeddedPostgres(private / "pg").start()
        assert not (private / "pg").exists()
    finally:
        shutil.rmtree(private)


def test_find_pg_binaries(work_dir: Path) -> None:
    empty = str(work_dir)  # a PATH without PostgreSQL on it
    with pytest.raises(EmbeddedPostgresError, match=r"initdb.*postgres.*pg_ctl"):
        find_pg_binaries(path=empty, patterns=())
    # Without PATH, the distribution directories are searched.
    found = find_pg_binaries(path=empty)
    assert os.path.basename(found.postgres) == "postgres"
    assert os.path.dirname(found.initdb) == os.path.dirname(found.postgres)


# -- libvirtd -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[ManagedNode, ManagedNode]]:
    """Two nodes for the whole module: each new node probes qemu once (~2 s)."""
    path = Path(tempfile.mkdtemp(prefix="tm-emb-nodes-"))
    path.chmod(0o755)
    a, b = ManagedNode(path, "a"), ManagedNode(path, "b")
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(path, ignore_errors=True)
    for node in (a, b):
        assert node.pid is None and node.guest_pids() == []


def host_uuid(uri: str) -> str | None:
    conn = libvirt.open(uri)
    try:
        return ET.fromstring(conn.getCapabilities()).findtext("host/uuid")
    finally:
        conn.close()


@pytest.mark.slow
def test_nodes_have_distinct_host_uuids(nodes: tuple[ManagedNode, ManagedNode]) -> None:
    a, b = nodes
    # The test driver reports no host UUID in its capabilities; the qemu driver of
    # the same daemon reports the configured host_uuid.
    assert host_uuid(a.qemu_uri) == a.host_uuid
    assert host_uuid(b.qemu_uri) == b.host_uuid
    assert a.host_uuid != b.host_uuid
    # Stable: derived from the node's directory.
    assert ManagedNode(a.base_dir, "a").host_uuid == a.host_uuid
    assert a.pid is not None and b.pid is not None
    if IS_ROOT:
        assert os.stat(f"/proc/{a.pid}").st_uid != 0, "libvirtd must not run as root"


DEFINE_TEST_DOMAIN = """
import sys, libvirt
conn = libvirt.open(sys.argv[1])
conn.defineXML(
    "<domain type='test'><name>%s</name><memory>65536</memory>"
    "<os><type>hvm</type></os></domain>" % sys.argv[2]
)
conn.close()
"""

LIST_DOMAINS = """
import sys, libvirt
conn = libvirt.open(sys.argv[1])
print(" ".join(d.name() for d in conn.listAllDomains()))
conn.close()
"""


@pytest.mark.slow
def test_test_driver_state_is_shared_across_processes(
    nodes: tuple[ManagedNode, ManagedNode],
) -> None:
    a, b = nodes
    name = f"shared-{uuid.uuid4().hex[:8]}"
    # Defined by one process that then exits, listed by another: the node's
    # keeper connection keeps the test driver's in-memory state alive in between.
    run_python(DEFINE_TEST_DOMAIN, a.test_uri, name)
    assert name in run_python(LIST_DOMAINS, a.test_uri).split()

    conn = libvirt.open(a.test_uri)
    try:
        assert name in [d.name() for d in conn.listAllDomains()]
        conn.lookupByName(name).undefine()
        assert name not in run_python(LIST_DOMAINS, a.test_uri).split()
    finally:
        conn.close()

    # Each node has its own state.
    run_python(DEFINE_TEST_DOMAIN, a.test_uri, name)
    assert name not in run_python(LIST_DOMAINS, b.test_uri).split()


def qemu_domain_xml(name: str) -> str:
    return f"""
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>{QEMU}</emulator>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>
  </devices>
</domain>"""


needs_qemu = pytest.mark.skipif(not os.access(QEMU, os.X_OK), reason=f"{QEMU} not installed (Debian: qemu-system-x86)")


@pytest.mark.slow
@needs_qemu
def test_qemu_guest_define_start_destroy(nodes: tuple[ManagedNode, ManagedNode]) -> None:
    a, _ = nodes
    conn = libvirt.open(a.qemu_uri)
    try:
        dom = conn.defineXML(qemu_domain_xml("guest-1"))
        try:
            dom.create()
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            assert len(a.guest_pids()) == 1
            dom.destroy()
            assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
            assert a.guest_pids() == []
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
    finally:
        conn.close()


@pytest.fixture
def lone_node(work_dir: Path) -> Iterator[ManagedNode]:
    node = ManagedNode(work_dir, "lone")
    try:
        yield node
    finally:
        node.stop()


@pytest.mark.slow
@needs_qemu
def test_node_kill_restart_and_stop_guests(lone_node: ManagedNode) -> None:
    node = lone_node
    node.start()
    conn = libvirt.open(node.qemu_uri)
    try:
        conn.defineXML(qemu_domain_xml("survivor")).create()
    finally:
        conn.close()
    [guest] = node.guest_pids()

    # A daemon crash does not take its guests down (they are in their own session)...
    daemon = node.pid
    assert daemon is not None
    node.kill()
    assert node.pid is None and proc_state(daemon) == "gone"
    assert node.guest_pids() == [guest]
    # ...and a new daemon finds them again.
    node.start()
    conn = libvirt.open(node.qemu_uri)
    try:
        assert conn.lookupByName("survivor").state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        conn.close()
    node.restart()
    assert node.guest_pids() == [guest]

    # stop() after a crash: no daemon left to destroy the guest, so it is killed.
    node.kill()
    node.stop()
    assert proc_state(guest) != "alive"
    assert node.guest_pids() == []
    node.stop()  # idempotent


def test_node_start_failure_and_unreachable_dir(work_dir: Path) -> None:
    # A second daemon for a directory a live one serves is refused up front.
    first = ManagedNode(work_dir, "n")
    second = ManagedNode(work_dir, "n")
    try:
        first.start()
        with pytest.raises(ManagedNodeError, match="already running"):
            second.start(timeout=10)
        assert second.pid is None
    finally:
        second.stop()
        first.stop()

    if IS_ROOT:
        private = Path(tempfile.mkdtemp(prefix="tm-emb-private-"))
        try:
            with pytest.raises(ManagedNodeError, match="cannot traverse"):
                ManagedNode(private, "n").start()
        finally:
            shutil.rmtree(private)
