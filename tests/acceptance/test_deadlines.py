"""A node that stops answering cannot hang a shard: libvirt keepalive turns the
silence into a transient error (retried), and past task_timeout the supervisor
kills the stuck shard, whose task is then reconciled."""

from __future__ import annotations

import os
import signal

import pytest

from taskomatic.embedded.libvirtd import ManagedNode
from tests.acceptance import checks
from tests.helpers import query, wait_for

# Slow (not in the inner loop): waits for keepalive and task deadlines to run out.
pytestmark = pytest.mark.slow


def _node_with_running_vm(dsn, state_dir, name):
    state_dir.chmod(0o755)
    node = ManagedNode(state_dir / f"node-{name}", name)
    node.start()
    host = query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                      "VALUES (%s, %s, 'TEST', 8, 8388608) RETURNING id", (name, node.test_uri))[0]["id"]
    [vm] = checks.insert_vms(dsn, [f"{checks.unique_prefix(dsn)}-{name}"])
    checks.insert_tasks(dsn, [("Vm", vm, "create_vm"), ("Vm", vm, "start_vm", {"host_id": host})])
    return node, host, vm


def test_a_paused_node_is_detected_by_keepalive_and_retried(dsn, state_dir, daemon_factory):
    node, _, vm = _node_with_running_vm(dsn, state_dir, "sleepy")
    try:
        daemon = daemon_factory(shards=1, extra=["--set", "keepalive_interval=1", "--set", "keepalive_count=2",
                                                 "--set", "retry_backoff_max=2", "--set", "retry_limit=50"])
        checks.wait_all_ended(dsn, daemon)
        os.kill(node.pid, signal.SIGSTOP)
        [suspend] = checks.insert_tasks(dsn, [("Vm", vm, "suspend_vm")])
        wait_for(lambda: f"task {suspend} (suspend_vm" in daemon.log() and "retrying in" in daemon.log(),
                 60, 0.1, "keepalive to turn the silent node into a retry")
        assert daemon.child_pids().get("shard 0"), "the shard must still be alive"
        os.kill(node.pid, signal.SIGCONT)
        row = checks.wait_task_ended(dsn, suspend, timeout=90)
        assert row["state"] == "finished", row
        checks.assert_vms_match_libvirt(dsn, [vm])
    finally:
        os.kill(node.pid, signal.SIGCONT)
        node.stop()


def test_a_shard_stuck_past_task_timeout_is_killed_and_its_task_reconciled(dsn, state_dir, daemon_factory):
    node, _, vm = _node_with_running_vm(dsn, state_dir, "stuck")
    try:
        # Keepalive far away, so only the hard deadline can end the wait.
        daemon = daemon_factory(shards=1, extra=["--set", "task_timeout=3", "--set", "keepalive_interval=600"])
        checks.wait_all_ended(dsn, daemon)
        old = daemon.child_pids()["shard 0"]
        os.kill(node.pid, signal.SIGSTOP)
        [suspend] = checks.insert_tasks(dsn, [("Vm", vm, "suspend_vm")])
        wait_for(lambda: "stuck on a task past task_timeout" in daemon.log(), 60, 0.1, "the supervisor to act")
        wait_for(lambda: daemon.child_pids().get("shard 0") not in (None, old), 60, 0.1, "a new shard 0")
        os.kill(node.pid, signal.SIGCONT)
        row = checks.wait_task_ended(dsn, suspend, timeout=90)
        assert row["state"] == "finished", row
        checks.assert_all_ended_once(dsn)
        checks.assert_vms_match_libvirt(dsn, [vm])
    finally:
        os.kill(node.pid, signal.SIGCONT)
        node.stop()
