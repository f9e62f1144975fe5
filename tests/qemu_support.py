"""Real QEMU guests (TCG) on two private libvirtd nodes, for the acceptance suite.

A pytest plugin: a test module takes these fixtures with
``from tests.qemu_support import *  # noqa``. Nothing here touches conftest.py.

- ``qemu_nodes`` (module): two ManagedNodes, distinct host_uuid, in a /tmp
  directory with mode 0755; stopped in a finalizer (which destroys their
  guests) even when tests fail, then checked with ``ps``: no qemu process of
  theirs may survive.
- ``qemu_hosts`` (test): one ``hosts`` row per node, ``hypervisor_type='QEMU'``.
- ``save_dir`` (test): a 0777 directory both nodes' libvirtd (user nobody) can write.
- ``qemu_vms`` (test): inserts VMs named after the test's database (libvirt
  domain names must be unique per node) and removes whatever domains of
  theirs a failed test left on the nodes.

Helpers submit tasks, wait for them (failing early, with the daemon's log,
if it died) and check a VM's row against both nodes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from psycopg2.extras import Json

from tests.acceptance.checks import remove_domains, unique_prefix
from tests.helpers import Daemon, query, wait_for

QEMU = "/usr/bin/qemu-system-x86_64"
VM_MEMORY_KB = 65536
HOST_CPUS = 4
HOST_MEMORY_KB = 1048576
TERMINAL = ("finished", "failed", "canceled")
# TCG on a 2-core machine is slow: waits are generous, never a measure of speed.
TASK_TIMEOUT = 180.0

__all__ = [
    "QEMU", "VM_MEMORY_KB", "QemuHost", "assert_vm_consistent", "domain_info", "qemu_hosts",
    "qemu_nodes", "qemu_processes", "qemu_vms", "run_task", "save_dir", "start_qemu_daemon",
    "submit_task", "vm_row", "wait_task_ended",
]


def _private_dir(prefix: str, mode: int) -> Path:
    # Under /tmp: pytest's tmp_path may sit below a directory user nobody cannot enter.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(mode)
    return path


def qemu_processes(marker: str) -> list[str]:
    """``ps`` lines of live qemu processes whose command line mentions ``marker``."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True,
                         check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split(None, 2)
        if len(fields) < 3 or fields[1].startswith("Z"):
            continue
        if "qemu-system" in fields[2] and marker in fields[2]:
            found.append(line.strip())
    return found


@pytest.fixture(scope="module")
def qemu_nodes() -> Iterator[list[Any]]:
    """Two private libvirtd nodes (qemu session driver) for the whole module."""
    from taskomatic.embedded.libvirtd import ManagedNode

    if not os.access(QEMU, os.X_OK):
        pytest.skip(f"{QEMU} not installed (Debian: qemu-system-x86)")
    base = _private_dir("tkm-qemu-", 0o755)
    nodes = [ManagedNode(base, f"qnode{i}", keep_test_state=False) for i in range(2)]
    try:
        for node in nodes:
            node.start()
        assert nodes[0].host_uuid != nodes[1].host_uuid
        yield nodes
    finally:
        errors = []
        for node in nodes:
            try:
                node.stop()  # destroys the node's guests, kills any it could not
            except Exception as exc:  # stop the other node all the same
                errors.append(f"{node.name}: {exc}")
        left = qemu_processes(str(base) + "/")
        shutil.rmtree(base, ignore_errors=True)
        assert not errors, f"stopping the qemu nodes failed: {errors}"
        assert not left, f"qemu processes left behind by the qemu nodes: {left}"


@dataclass(frozen=True)
class QemuHost:
    id: int
    uri: str
    node: Any


@pytest.fixture
def qemu_hosts(dsn: str, qemu_nodes: list[Any]) -> list[QemuHost]:
    """One QEMU ``hosts`` row per node in this test's database, as a UI would insert it."""
    hosts = []
    for i, node in enumerate(qemu_nodes):
        row = query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                         "VALUES (%s, %s, 'QEMU', %s, %s) RETURNING id",
                    (f"qemu-node{i}", node.qemu_uri, HOST_CPUS, HOST_MEMORY_KB))[0]
        hosts.append(QemuHost(int(row["id"]), node.qemu_uri, node))
    return hosts


@pytest.fixture
def save_dir() -> Iterator[Path]:
    """Where save_vm puts memory images: writable by both nodes' libvirtd (user nobody)."""
    path = _private_dir("tkm-save-", 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qemu_vms(dsn: str, qemu_hosts: list[QemuHost]) -> Iterator[Callable[[str], int]]:
    """make(label) -> id of a new 64 MiB, 1 vcpu VM named ``<dbname>-<label>``.

    At the end, domains of this test's VMs still on the nodes (a failed test)
    are destroyed and undefined, so they cannot disturb the next test; then no
    guest may run on either node. Checked after every test, so the check does not
    depend on which test runs last (the module finalizer checks again with ps
    once the nodes are stopped).
    """
    prefix = unique_prefix(dsn)

    def make(label: str) -> int:
        row = query(dsn, "INSERT INTO vms (description, memory_allocated, num_vcpus_allocated) "
                         "VALUES (%s, %s, 1) RETURNING id", (f"{prefix}-{label}", VM_MEMORY_KB))[0]
        return int(row["id"])

    yield make
    remove_domains([h.uri for h in qemu_hosts], prefix)

    def guests_left() -> dict[str, list[int]]:
        return {h.node.name: pids for h in qemu_hosts if (pids := h.node.guest_pids())}

    try:
        wait_for(lambda: not guests_left(), 10, 0.1, "the nodes' guests to be gone")
    except AssertionError:
        raise AssertionError(f"guests (node: pids) still run after this test: {guests_left()}") from None


def start_qemu_daemon(daemon_factory: Callable[..., Daemon], save_dir: Path, *extra: str) -> Daemon:
    """The real daemon, 2 shards, set up for the qemu nodes (plus ``--set`` pairs in ``extra``)."""
    args = ["--set", f"save_dir={save_dir}", "--set", "migration_uri=tcp://127.0.0.1",
            "--set", "shutdown_timeout=5"]
    for pair in extra:
        args += ["--set", pair]
    return daemon_factory(shards=2, extra=args)


# -- tasks ---------------------------------------------------------------------------
def submit_task(dsn: str, vm_id: int, action: str, args: Any = None) -> int:
    """INSERT a Vm task as another program would; its id."""
    row = query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by) "
                     "VALUES ('Vm', %s, %s, %s, 'qemu acceptance') RETURNING id",
                (vm_id, action, Json({} if args is None else args)))[0]
    return int(row["id"])


def wait_task_ended(dsn: str, task_id: int, daemon: Daemon | None = None,
                    timeout: float = TASK_TIMEOUT) -> dict[str, Any]:
    """Poll until the task is terminal; fail early (with the daemon's log) if the daemon died."""

    def ended() -> dict[str, Any] | None:
        if daemon is not None and daemon.process.poll() is not None:
            raise AssertionError(f"daemon exited with {daemon.process.returncode} while task {task_id} "
                                 f"was open:\n{daemon.log()[-4000:]}")
        row = query(dsn, "SELECT * FROM tasks WHERE id = %s", (task_id,))[0]
        return row if row["state"] in TERMINAL else None

    try:
        row = wait_for(ended, timeout, 0.1, f"task {task_id} to end")
    except AssertionError as exc:
        if daemon is not None and "timed out" in str(exc):
            raise AssertionError(f"{exc}\n{daemon.log()[-4000:]}") from None
        raise
    assert row is not None
    return row


def run_task(dsn: str, daemon: Daemon, vm_id: int, action: str, args: Any = None,
             timeout: float = TASK_TIMEOUT) -> dict[str, Any]:
    """Submit one task and wait for it to end; the task row (plus ``wall`` seconds)."""
    started = time.monotonic()
    row = wait_task_ended(dsn, submit_task(dsn, vm_id, action, args), daemon, timeout)
    row["wall"] = time.monotonic() - started
    return row


def vm_row(dsn: str, vm_id: int) -> dict[str, Any]:
    return query(dsn, "SELECT id, uuid::text AS uuid, description, state, host_id, vnc_port, "
                      "memory_used, num_vcpus_used FROM vms WHERE id = %s", (vm_id,))[0]


# -- libvirt ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DomainInfo:
    state: int
    persistent: bool
    vnc_port: int | None


def domain_info(uri: str, vm_uuid: str) -> DomainInfo | None:
    """The domain of ``vm_uuid`` on the node at ``uri`` as libvirt reports it, or None."""
    conn = libvirt.open(uri)
    try:
        # Listing, not lookupByUUIDString: a miss would print libvirt's error on stderr.
        found = [d for d in conn.listAllDomains(0) if d.UUIDString() == vm_uuid]
        if not found:
            return None
        [dom] = found
        port = None
        for graphics in ET.fromstring(dom.XMLDesc(0)).iter("graphics"):
            if graphics.get("type") == "vnc" and int(graphics.get("port") or -1) > 0:
                port = int(graphics.get("port") or -1)
        return DomainInfo(dom.state()[0], bool(dom.isPersistent()), port)
    finally:
        conn.close()


_ACTIVE_STATE = {"running": libvirt.VIR_DOMAIN_RUNNING, "suspended": libvirt.VIR_DOMAIN_PAUSED}


def assert_vm_consistent(dsn: str, vm_id: int, hosts: list[QemuHost], save_dir: Path,
                         expected: str) -> dict[str, Any]:
    """The VM row says ``expected`` and both nodes agree; returns the row.

    running/suspended: the domain is active in that state on the row's host only,
    the row's vnc_port is the domain's, resources are counted. saved: the domain is
    defined and shut off on the row's host, its image is in save_dir. stopped: no
    host, no domain on any node, nothing counted.
    """
    row = vm_row(dsn, vm_id)
    domains = {h.id: domain_info(h.uri, row["uuid"]) for h in hosts}
    context = f"row {row}, domains {domains}"
    assert row["state"] == expected, context
    image = save_dir / f"taskomatic-vm{vm_id}-{row['uuid']}.save"
    elsewhere = {h: d for h, d in domains.items() if h != row["host_id"] and d is not None}
    assert not elsewhere, f"VM {vm_id} has a domain on a host other than its own: {context}"
    if expected in _ACTIVE_STATE:
        here = domains.get(row["host_id"])
        assert here is not None and here.state == _ACTIVE_STATE[expected], context
        assert here.persistent, f"the domain should stay defined while it runs: {context}"
        assert row["vnc_port"] is not None and row["vnc_port"] == here.vnc_port, context
        assert (row["memory_used"], row["num_vcpus_used"]) == (VM_MEMORY_KB, 1), context
        assert not image.exists(), f"a save image outlived its restore: {image} ({context})"
    elif expected == "saved":
        here = domains.get(row["host_id"])
        assert here is not None and here.state == libvirt.VIR_DOMAIN_SHUTOFF, context
        assert image.is_file() and image.stat().st_size > 0, f"no save image {image}: {context}"
        assert row["vnc_port"] is None, context
    elif expected == "stopped":
        assert row["host_id"] is None and row["vnc_port"] is None, context
        assert all(d is None for d in domains.values()), context
        assert (row["memory_used"], row["num_vcpus_used"]) == (0, 0), context
    return row
