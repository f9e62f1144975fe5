"""Placement under a burst of concurrent starts never overcommits a host, and
start_vm defines the VM's disks from its storage volumes."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt
import pytest

from tests.acceptance import checks
from tests.helpers import query

# Slow (not in the inner loop): bursts of concurrent starts through the daemon.
pytestmark = pytest.mark.slow


def test_a_burst_of_starts_never_overcommits(dsn, libvirt_nodes, daemon_factory):
    prefix = checks.unique_prefix(dsn)
    # Two hosts of 4 vcpus and 1 GiB each: room for 8 VMs of 1 vcpu / 256 MiB, whatever the order.
    hosts = [query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                        "VALUES (%s, %s, 'TEST', 4, 1048576) RETURNING id", (f"small{i}", node.test_uri))[0]["id"]
             for i, node in enumerate(libvirt_nodes)]
    vm_ids = checks.insert_vms(dsn, [f"{prefix}-burst-{i:02d}" for i in range(20)], memory_kb=262144)
    checks.insert_tasks(dsn, [("Vm", vm, "create_vm") for vm in vm_ids])
    daemon = daemon_factory(shards=8)
    checks.wait_all_ended(dsn, daemon)
    checks.insert_tasks(dsn, [("Vm", vm, "start_vm") for vm in vm_ids])  # all at once, over 8 shards
    checks.wait_all_ended(dsn, daemon)

    starts = query(dsn, "SELECT state, message FROM tasks WHERE action = 'start_vm'")
    assert sum(r["state"] == "finished" for r in starts) == 8
    refused = [r["message"] for r in starts if r["state"] == "failed"]
    assert len(refused) == 12 and all("no available, enabled host has" in m for m in refused), refused
    for host in hosts:
        used = query(dsn, "SELECT coalesce(sum(memory_allocated), 0) AS mem, "
                          "coalesce(sum(num_vcpus_allocated), 0) AS cpus FROM vms "
                          "WHERE host_id = %s AND state = 'running'", (host,))[0]
        assert used == {"mem": 1048576, "cpus": 4}, (host, used)  # full, never over
    checks.assert_vms_match_libvirt(dsn, vm_ids)


def test_start_vm_attaches_the_vms_volumes_and_refuses_missing_ones(dsn, hosts, daemon_factory):
    prefix = checks.unique_prefix(dsn)
    pool = query(dsn, "INSERT INTO storage_pools (name, pool_type, target_path, state) "
                      "VALUES (%s, 'dir', '/srv/images', 'available') RETURNING id", (f"{prefix}-pool",))[0]["id"]
    ready = query(dsn, "INSERT INTO storage_volumes (storage_pool_id, name, size, path, state) "
                       "VALUES (%s, 'root.img', 1048576, '/srv/images/root.img', 'available') RETURNING id",
                  (pool,))[0]["id"]
    pending = query(dsn, "INSERT INTO storage_volumes (storage_pool_id, name, size) "
                         "VALUES (%s, 'data.img', 1048576) RETURNING id", (pool,))[0]["id"]
    with_disk, missing_disk = checks.insert_vms(dsn, [f"{prefix}-disk", f"{prefix}-nodisk"])
    query(dsn, "INSERT INTO vm_disks (vm_id, storage_volume_id, position) VALUES (%s, %s, 0), (%s, %s, 0) "
               "RETURNING vm_id", (with_disk, ready, missing_disk, pending))
    checks.insert_tasks(dsn, [("Vm", vm, action) for vm in (with_disk, missing_disk)
                              for action in ("create_vm", "start_vm")])
    daemon = daemon_factory(shards=2)
    checks.wait_all_ended(dsn, daemon)

    rows = {(r["task_target_id"], r["action"]): r for r in query(dsn, "SELECT * FROM tasks")}
    assert rows[(with_disk, "start_vm")]["state"] == "finished"
    failed = rows[(missing_disk, "start_vm")]
    assert failed["state"] == "failed" and "data.img" in failed["message"] and "pending_setup" in failed["message"]
    vm = query(dsn, "SELECT v.uuid::text AS uuid, h.libvirt_uri FROM vms v JOIN hosts h ON h.id = v.host_id "
                    "WHERE v.id = %s", (with_disk,))[0]
    conn = libvirt.open(vm["libvirt_uri"])
    try:
        root = ET.fromstring(conn.lookupByUUIDString(vm["uuid"]).XMLDesc(0))
    finally:
        conn.close()
    assert [d.find("source").get("file") for d in root.findall("devices/disk")] == ["/srv/images/root.img"]
