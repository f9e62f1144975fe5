"""A fleet on real QEMU guests (TCG) on two real libvirtd nodes: storage-aware placement,
clear_vms emptying a host, and the host-status pass finding what moved.

Both nodes run on this machine, so a directory is seen by both: a pool over it is
*shared* when the row says so (``storage_pools.shared``), and *local* to its host
otherwise, which is what the daemon goes by.
"""

from __future__ import annotations

import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.acceptance import checks
from tests.acceptance.checks import assert_all_ended_once, assert_key_order
from tests.helpers import query, wait_for
from tests.qemu_support import *  # noqa: F403 - fixtures (pytest plugin) and helpers
from tests.qemu_support import QemuHost, assert_vm_consistent, run_task, start_qemu_daemon, vm_row

MiB = 1024 * 1024


def _finished(row: dict[str, Any], what: str = "") -> dict[str, Any]:
    assert row["state"] == "finished", f"{what}: {row['action']} ended {row['state']}: {row['message']}"
    return row


def _failed(row: dict[str, Any], *words: str) -> dict[str, Any]:
    assert row["state"] == "failed", f"{row['action']} should fail, it {row['state']}: {row['message']}"
    for word in words:
        assert word in (row["message"] or ""), f"{row['action']}: {word!r} not in {row['message']!r}"
    return row


@pytest.fixture
def pool_base(dsn: str, qemu_hosts: list[QemuHost]) -> Iterator[Path]:
    """A directory for the test's pools (the nodes' libvirtd, user nobody, can enter it);
    the test's pools are removed from both nodes afterwards."""
    prefix = checks.unique_prefix(dsn)
    base = Path(tempfile.mkdtemp(prefix=f"tkm-fleet-{prefix}-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for host in qemu_hosts:
            for pool in _pools_named(host.uri, prefix):
                if pool.isActive():
                    pool.destroy()
                pool.undefine()
        shutil.rmtree(base, ignore_errors=True)


def _pools_named(uri: str, prefix: str) -> list[libvirt.virStoragePool]:
    conn = libvirt.open(uri)  # left open: the pools returned use it
    return [p for p in conn.listAllStoragePools(0) if p.name().startswith(prefix)]


def _pool_active(uri: str, name: str) -> bool:
    conn = libvirt.open(uri)
    try:
        return any(p.name() == name and p.isActive() for p in conn.listAllStoragePools(0))
    finally:
        conn.close()


def _pool_with_volume(dsn: str, base: Path, name: str, volume: str, host_id: int | None = None,
                      shared: bool = False) -> tuple[int, int, str]:
    """A dir pool over ``base/name`` holding one 1 MiB raw volume (rows as refresh_pool would leave them)."""
    directory = base / name
    directory.mkdir(mode=0o777)
    directory.chmod(0o777)
    path = directory / volume
    with open(path, "wb") as image:
        image.truncate(MiB)
    path.chmod(0o666)
    pool = query(dsn, "INSERT INTO storage_pools (name, pool_type, target_path, state, host_id, shared) "
                      "VALUES (%s, 'dir', %s, 'available', %s, %s) RETURNING id",
                 (name, str(directory), host_id, shared))[0]["id"]
    vol = query(dsn, "INSERT INTO storage_volumes (storage_pool_id, name, size, path, state) "
                     "VALUES (%s, %s, 1024, %s, 'available') RETURNING id", (pool, volume, str(path)))[0]["id"]
    return pool, vol, str(path)


def _attach(dsn: str, vm: int, *volumes: int) -> None:
    for position, volume in enumerate(volumes):
        query(dsn, "INSERT INTO vm_disks (vm_id, storage_volume_id, position) VALUES (%s, %s, %s) "
                   "RETURNING vm_id", (vm, volume, position))


def _disk_files(uri: str, vm_uuid: str) -> list[str]:
    conn = libvirt.open(uri)
    try:
        root = ET.fromstring(conn.lookupByUUIDString(vm_uuid).XMLDesc(0))
    finally:
        conn.close()
    return [d.find("source").get("file") for d in root.findall("devices/disk")]  # type: ignore[union-attr]


def test_placement_follows_the_disks_and_shared_disks_migrate(dsn, qemu_hosts, qemu_vms, save_dir, pool_base,
                                                              daemon_factory):
    """A disk on a pool local to the second host places the VM there (the first host has as much
    room and a lower id, so load alone would pick it); a disk on a shared pool lets the VM start
    on one host and live-migrate to the other, the pool made active on each first; a VM with local
    disks is not migrated; disks on local pools of two hosts cannot start anywhere."""
    a, b = qemu_hosts
    prefix = checks.unique_prefix(dsn)
    _local_a, on_a, _ = _pool_with_volume(dsn, pool_base, f"{prefix}-local-a", "a.img", host_id=a.id)
    _local_b, on_b, local_path = _pool_with_volume(dsn, pool_base, f"{prefix}-local-b", "b.img", host_id=b.id)
    shared_name = f"{prefix}-shared"
    _shared, on_shared, shared_path = _pool_with_volume(dsn, pool_base, shared_name, "s.img", shared=True)
    pinned, mobile, split = qemu_vms("pinned"), qemu_vms("mobile"), qemu_vms("split")
    _attach(dsn, pinned, on_b)
    _attach(dsn, mobile, on_shared)
    _attach(dsn, split, on_a, on_b)
    daemon = start_qemu_daemon(daemon_factory, save_dir)
    for vm in (pinned, mobile, split):
        _finished(run_task(dsn, daemon, vm, "create_vm"))

    _finished(run_task(dsn, daemon, pinned, "start_vm"), "start by a local disk")
    row = assert_vm_consistent(dsn, pinned, qemu_hosts, save_dir, "running")
    assert row["host_id"] == b.id, "placement must follow the disk on the second host's local pool"
    assert _pool_active(b.uri, f"{prefix}-local-b") and not _pool_active(a.uri, f"{prefix}-local-b")
    assert _disk_files(b.uri, row["uuid"]) == [local_path]
    _failed(run_task(dsn, daemon, pinned, "migrate_vm"), "local storage", f"{prefix}-local-b")
    assert assert_vm_consistent(dsn, pinned, qemu_hosts, save_dir, "running")["host_id"] == b.id

    _failed(run_task(dsn, daemon, split, "start_vm"), "different hosts", f"{prefix}-local-a",
            f"{prefix}-local-b", f"host {a.id}", f"host {b.id}")
    assert_vm_consistent(dsn, split, qemu_hosts, save_dir, "stopped")

    assert not _pool_active(a.uri, shared_name) and not _pool_active(b.uri, shared_name)
    _finished(run_task(dsn, daemon, mobile, "start_vm", {"host_id": a.id}))
    assert _pool_active(a.uri, shared_name) and not _pool_active(b.uri, shared_name)
    _finished(run_task(dsn, daemon, mobile, "migrate_vm"), "migrate with a shared disk")
    row = assert_vm_consistent(dsn, mobile, qemu_hosts, save_dir, "running")
    assert row["host_id"] == b.id
    assert _pool_active(b.uri, shared_name), "the shared pool must be active on the destination"
    assert _disk_files(b.uri, row["uuid"]) == [shared_path]

    for vm in (pinned, mobile):
        _finished(run_task(dsn, daemon, vm, "poweroff_vm"))
        assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "stopped")
    assert_all_ended_once(dsn, single_attempt=True)


def test_clear_vms_empties_a_host_of_running_paused_stopped_and_saved_vms(dsn, qemu_hosts, qemu_vms, save_dir,
                                                                           daemon_factory):
    a, b = qemu_hosts
    daemon = start_qemu_daemon(daemon_factory, save_dir, "save_dir_shared=yes")
    running, paused, stopped, saved = (qemu_vms(label) for label in ("running", "paused", "stopped", "saved"))
    for vm in (running, paused, stopped, saved):
        _finished(run_task(dsn, daemon, vm, "create_vm"))
    for vm in (running, paused, saved):
        _finished(run_task(dsn, daemon, vm, "start_vm", {"host_id": a.id}))
    _finished(run_task(dsn, daemon, paused, "suspend_vm"))
    _finished(run_task(dsn, daemon, saved, "save_vm"))
    # A stopped VM whose row still names the host (as a UI or an old daemon may leave it).
    query(dsn, "UPDATE vms SET host_id = %s WHERE id = %s RETURNING id", (a.id, stopped))

    query(dsn, "UPDATE hosts SET is_disabled = true WHERE id = %s RETURNING id", (a.id,))
    [clear] = checks.insert_tasks(dsn, [("Host", a.id, "clear_vms")])
    row = checks.wait_task_ended(dsn, clear, timeout=300)
    assert row["state"] == "finished", (row, daemon.log()[-3000:])
    assert query(dsn, "SELECT count(*) AS n FROM vms WHERE host_id = %s", (a.id,))[0]["n"] == 0
    assert f"VM {stopped} " in row["message"] and f"VM {saved} " in row["message"], row["message"]

    for vm, state in ((running, "running"), (paused, "suspended"), (saved, "saved")):
        assert assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, state)["host_id"] == b.id, vm
    assert_vm_consistent(dsn, stopped, qemu_hosts, save_dir, "stopped")
    # The saved VM really moved: it restores on its new host.
    _finished(run_task(dsn, daemon, saved, "restore_vm"))
    assert assert_vm_consistent(dsn, saved, qemu_hosts, save_dir, "running")["host_id"] == b.id

    _finished(run_task(dsn, daemon, paused, "resume_vm"))  # it resumes where it was moved
    assert assert_vm_consistent(dsn, paused, qemu_hosts, save_dir, "running")["host_id"] == b.id
    for vm in (running, paused, saved):
        _finished(run_task(dsn, daemon, vm, "poweroff_vm"))
        assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "stopped")
    assert_all_ended_once(dsn, single_attempt=True)
    assert_key_order(dsn)


def test_host_status_finds_a_domain_moved_behind_our_back(dsn, qemu_hosts, qemu_vms, save_dir, daemon_factory):
    """Live-migrated with libvirt directly: the pass records the VM on its new host, once.
    Then its save image is deleted: the pass stops the saved VM, once."""
    a, b = qemu_hosts
    daemon = start_qemu_daemon(daemon_factory, save_dir, "reconcile_interval=0.5", "log_level=debug")
    vm = qemu_vms("moved")
    _finished(run_task(dsn, daemon, vm, "create_vm"))
    _finished(run_task(dsn, daemon, vm, "start_vm", {"host_id": a.id}))
    uuid = assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")["uuid"]

    source, destination = libvirt.open(a.uri), libvirt.open(b.uri)
    try:
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        source.lookupByUUIDString(uuid).migrate(destination, flags, None, "tcp://127.0.0.1", 0)
    finally:
        source.close()
        destination.close()
    wait_for(lambda: vm_row(dsn, vm)["host_id"] == b.id, 60, what="the moved VM recorded on its new host")
    assert vm_row(dsn, vm)["state"] == "running"
    passes = daemon.log().count("host-status pass")
    wait_for(lambda: daemon.log().count("host-status pass") >= passes + 2, 30, what="two more passes")
    assert daemon.log().count("recorded where it is") == 1, daemon.log()[-3000:]
    # Later tasks find it where it is.
    _finished(run_task(dsn, daemon, vm, "save_vm"))
    row = assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "saved")
    assert row["host_id"] == b.id

    (save_dir / f"taskomatic-vm{vm}-{uuid}.save").unlink()
    wait_for(lambda: vm_row(dsn, vm)["state"] == "stopped", 60, what="the saved VM without an image stopped")
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "stopped")
    passes = daemon.log().count("host-status pass")
    wait_for(lambda: daemon.log().count("host-status pass") >= passes + 2, 30, what="two more passes")
    assert daemon.log().count("is gone: now stopped") == 1, daemon.log()[-3000:]
    _finished(run_task(dsn, daemon, vm, "start_vm"))
    _finished(run_task(dsn, daemon, vm, "poweroff_vm"))
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "stopped")
