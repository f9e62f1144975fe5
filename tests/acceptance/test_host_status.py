"""The host-status pass makes VM and host rows agree with the nodes, without
touching a VM that has a task running."""

from __future__ import annotations

import libvirt
import pytest

from taskomatic.embedded.libvirtd import ManagedNode
from tests.acceptance import checks
from tests.helpers import query, wait_for

# Slow (not in the inner loop): private nodes killed and restarted under a daemon.
pytestmark = pytest.mark.slow

FAST = ["--set", "reconcile_interval=0.5", "--log-level", "debug"]


def _vm_row(dsn, vm):
    return query(dsn, "SELECT state, host_id FROM vms WHERE id = %s", (vm,))[0]


def _domain(dsn, vm):
    row = query(dsn, "SELECT v.uuid::text AS uuid, h.libvirt_uri FROM vms v JOIN hosts h ON h.id = v.host_id "
                     "WHERE v.id = %s", (vm,))[0]
    conn = libvirt.open(row["libvirt_uri"])
    return conn, conn.lookupByUUIDString(row["uuid"])


def test_changes_behind_our_back_are_corrected(dsn, hosts, daemon_factory):
    prefix = checks.unique_prefix(dsn)
    paused, killed, busy = checks.insert_vms(dsn, [f"{prefix}-paused", f"{prefix}-killed", f"{prefix}-busy"])
    checks.insert_tasks(dsn, [("Vm", vm, action) for vm in (paused, killed, busy)
                              for action in ("create_vm", "start_vm")])
    daemon = daemon_factory(shards=2, extra=FAST)
    checks.wait_all_ended(dsn, daemon)

    # A task of `busy` is running (as far as the database knows; held by an instance
    # elsewhere, as a running task always is): the pass must leave it alone.
    elsewhere = query(dsn, "INSERT INTO instances (hostname, pid, version, mode, shards) "
                           "VALUES ('elsewhere', 1, 'test', 'standalone', 1) RETURNING id")[0]["id"]
    query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, state, time_started, claimed_by) "
               "VALUES ('Vm', %s, 'suspend_vm', 'running', clock_timestamp(), %s) RETURNING id", (busy, elsewhere))
    for vm, act in ((paused, "suspend"), (killed, "destroy"), (busy, "destroy")):
        conn, domain = _domain(dsn, vm)
        getattr(domain, act)()
        conn.close()

    wait_for(lambda: _vm_row(dsn, paused)["state"] == "suspended", 30, what="the paused VM corrected")
    wait_for(lambda: _vm_row(dsn, killed) == {"state": "stopped", "host_id": None}, 30,
             what="the destroyed VM corrected")
    passes = daemon.log().count("host-status pass")
    wait_for(lambda: daemon.log().count("host-status pass") >= passes + 2, 30, what="two more passes")
    assert _vm_row(dsn, busy)["state"] == "running", "a VM with a running task must be left to that task"


def test_a_node_that_goes_away_and_comes_back(dsn, state_dir, daemon_factory):
    prefix = checks.unique_prefix(dsn)
    state_dir.chmod(0o755)
    node = ManagedNode(state_dir / "flaky", "flaky")
    node.start()
    try:
        host = query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                          "VALUES ('flaky', %s, 'TEST', 8, 8388608) RETURNING id", (node.test_uri,))[0]["id"]
        [vm] = checks.insert_vms(dsn, [f"{prefix}-flaky"])
        checks.insert_tasks(dsn, [("Vm", vm, "create_vm"), ("Vm", vm, "start_vm", {"host_id": host})])
        daemon = daemon_factory(shards=1, extra=FAST)
        checks.wait_all_ended(dsn, daemon)
        assert _vm_row(dsn, vm) == {"state": "running", "host_id": host}

        node.kill()
        wait_for(lambda: query(dsn, "SELECT state FROM hosts WHERE id = %s", (host,))[0]["state"] == "unavailable",
                 60, what="the host marked unavailable")
        wait_for(lambda: _vm_row(dsn, vm)["state"] == "unreachable", 30, what="its VM marked unreachable")

        # The test driver forgets its domains when its daemon restarts: the VM is gone.
        node.start()
        wait_for(lambda: query(dsn, "SELECT state FROM hosts WHERE id = %s", (host,))[0]["state"] == "available",
                 60, what="the host available again")
        wait_for(lambda: _vm_row(dsn, vm) == {"state": "stopped", "host_id": None}, 30,
                 what="the VM settled from what the node reports")
        [start] = checks.insert_tasks(dsn, [("Vm", vm, "start_vm", {"host_id": host})])
        assert checks.wait_task_ended(dsn, start)["state"] == "finished"
    finally:
        node.stop()


def test_a_node_killed_mid_run(dsn, state_dir, daemon_factory):
    """Tasks in flight on a node that dies retry as transient or fail; none hangs; the host goes
    unavailable; once the node is back every task has ended and the rows match the node."""
    prefix = checks.unique_prefix(dsn)
    state_dir.chmod(0o755)
    node = ManagedNode(state_dir / "doomed", "doomed")
    node.start()
    try:
        host = query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                          "VALUES ('doomed', %s, 'TEST', 64, 67108864) RETURNING id", (node.test_uri,))[0]["id"]
        vms = checks.insert_vms(dsn, [f"{prefix}-doomed-{i}" for i in range(6)])
        checks.insert_tasks(dsn, [("Vm", vm, a, {"host_id": host} if a == "start_vm" else {})
                                  for vm in vms for a in ("create_vm", "start_vm")])
        daemon = daemon_factory(shards=3, extra=[*FAST, "--set", "retry_limit=6", "--set", "retry_backoff_max=1",
                                                 "--set", "keepalive_interval=1", "--set", "keepalive_count=2",
                                                 "--set", "task_timeout=60"])
        checks.wait_all_ended(dsn, daemon)
        # A stream of work for every VM, then the node dies under it.
        checks.insert_tasks(dsn, [("Vm", vm, a) for _ in range(20) for vm in vms
                                  for a in ("suspend_vm", "resume_vm")])
        wait_for(lambda: query(dsn, "SELECT count(*) AS n FROM tasks WHERE state = 'finished' "
                                    "AND action = 'resume_vm'")[0]["n"] >= 6, 60, what="some work done")
        node.kill()
        wait_for(lambda: query(dsn, "SELECT state FROM hosts WHERE id = %s", (host,))[0]["state"] == "unavailable",
                 60, what="the host marked unavailable")
        wait_for(lambda: "retrying in" in daemon.log(), 60, what="transient retries")

        node.start()  # the test driver comes back empty: the VMs are gone
        checks.wait_all_ended(dsn, daemon, timeout=240)
        checks.assert_all_ended_once(dsn)
        checks.assert_key_order(dsn)
        assert query(dsn, "SELECT count(*) AS n FROM tasks WHERE state = 'running'")[0]["n"] == 0
        failed = query(dsn, "SELECT message FROM tasks WHERE state = 'failed'")
        assert all(("unreachable" in f["message"] or "stopped" in f["message"] or "interrupted" in f["message"])
                   for f in failed), failed
        wait_for(lambda: query(dsn, "SELECT state FROM hosts WHERE id = %s", (host,))[0]["state"] == "available",
                 60, what="the host available again")
        wait_for(lambda: {r["state"] for r in query(dsn, "SELECT state FROM vms WHERE id = ANY(%s)", (vms,))}
                 == {"stopped"}, 60, what="the VM rows settled from the node")
        checks.assert_vms_match_libvirt(dsn, vms)
    finally:
        node.stop()
