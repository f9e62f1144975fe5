"""Every VM action on real QEMU guests (TCG, diskless) on two real libvirtd nodes.

The real daemon (2 shards) runs each task against ``qemu+unix:///session`` nodes;
after each task the VM row is checked against what libvirt reports on both nodes
(tests.qemu_support.assert_vm_consistent). A diskless guest boots nothing, so it
also ignores ACPI: that is how the shutdown timeout is exercised.
"""

from __future__ import annotations

import libvirt
import pytest

from tests.acceptance import checks
from tests.acceptance.checks import assert_all_ended_once, assert_key_order
from tests.helpers import query
from tests.qemu_support import *  # noqa: F403 - fixtures (pytest plugin) and helpers
from tests.qemu_support import assert_vm_consistent, run_task, start_qemu_daemon, vm_row

# Slow (not in the inner loop): real QEMU guests.
pytestmark = pytest.mark.slow


def _finished(row, what=""):
    assert row["state"] == "finished", f"{what}: {row['action']} ended {row['state']}: {row['message']}"
    return row


def _failed(row, *words):
    assert row["state"] == "failed", f"{row['action']} should fail, it {row['state']}: {row['message']}"
    message = row["message"] or ""
    for word in words:
        assert word in message, f"{row['action']}: {word!r} not in the message {message!r}"
    return row


def test_lifecycle_every_action(dsn, qemu_hosts, qemu_vms, save_dir, daemon_factory, capsys):
    """create, start, suspend, resume, save, restore, migrate (placed), migrate back
    (args.host_id), shutdown (fallback: the guest ignores ACPI), start, poweroff."""
    daemon = start_qemu_daemon(daemon_factory, save_dir, "shutdown_poweroff_fallback=yes")
    vm = qemu_vms("life")
    a, b = qemu_hosts

    def step(action, expected, args=None):
        row = _finished(run_task(dsn, daemon, vm, action, args), action)
        return row, assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, expected)

    step("create_vm", "stopped")
    _, started = step("start_vm", "running")
    home = started["host_id"]
    assert home in (a.id, b.id)
    step("suspend_vm", "suspended")
    step("resume_vm", "running")
    step("save_vm", "saved")
    _, restored = step("restore_vm", "running")
    assert restored["host_id"] == home

    task, moved = step("migrate_vm", "running")  # placement: the only other host
    other = b.id if home == a.id else a.id
    assert moved["host_id"] == other
    placed_seconds = (task["time_ended"] - task["time_started"]).total_seconds()
    task, back = step("migrate_vm", "running", {"host_id": home})
    assert back["host_id"] == home
    back_seconds = (task["time_ended"] - task["time_started"]).total_seconds()
    with capsys.disabled():
        print(f"\nlive migration (64 MiB TCG guest, task time_started..time_ended): "
              f"placed {placed_seconds:.2f} s, back by host_id {back_seconds:.2f} s")

    task, _ = step("shutdown_vm", "stopped")
    assert "powering off" in daemon.log(), "the stop should have come from the poweroff fallback"
    step("start_vm", "running")
    step("poweroff_vm", "stopped")
    assert_all_ended_once(dsn, single_attempt=True)
    assert_key_order(dsn)


def test_no_op_and_impossible_states(dsn, qemu_hosts, qemu_vms, save_dir, daemon_factory):
    """Already in the success state: finished, nothing to do. Impossible start state:
    failed, naming the state. The VM is checked against libvirt after every task."""
    daemon = start_qemu_daemon(daemon_factory, save_dir)
    vm = qemu_vms("states")

    def task(action, expected, args=None):
        row = run_task(dsn, daemon, vm, action, args)
        assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, expected)
        return row

    def no_op(action, expected):
        row = _finished(task(action, expected), action)
        assert "nothing to do" in (row["message"] or ""), row["message"]

    _finished(task("create_vm", "stopped"))
    no_op("poweroff_vm", "stopped")
    no_op("shutdown_vm", "stopped")
    _failed(task("save_vm", "stopped"), "it is stopped", "needs running")
    _failed(task("restore_vm", "stopped"), "it is stopped", "needs saved")
    _failed(task("migrate_vm", "stopped"), "it is stopped", "needs running")
    _failed(task("resume_vm", "stopped"), "it is stopped", "needs suspended")
    _failed(task("suspend_vm", "stopped"), "it is stopped", "needs running")

    _finished(task("start_vm", "running"))
    no_op("start_vm", "running")
    # resume_vm and restore_vm succeed *into* running: per the oVirt table
    # (reference/ovirt-model.md) a VM already in the success state is a no-op.
    no_op("resume_vm", "running")
    no_op("restore_vm", "running")

    _finished(task("suspend_vm", "suspended"))
    no_op("suspend_vm", "suspended")
    _failed(task("start_vm", "suspended"), "it is suspended", "needs stopped")
    _failed(task("save_vm", "suspended"), "it is suspended", "needs running")
    # migrate_vm of a suspended VM is no longer impossible: it moves paused (test_fleets.py).
    _finished(task("resume_vm", "running"))

    _finished(task("save_vm", "saved"))
    no_op("save_vm", "saved")
    _failed(task("start_vm", "saved"), "it is saved", "needs stopped")
    _failed(task("migrate_vm", "saved"), "it is saved", "needs running")
    _finished(task("restore_vm", "running"))

    _finished(task("poweroff_vm", "stopped"))
    assert_all_ended_once(dsn, single_attempt=True)
    assert_key_order(dsn)


def test_migrate_bad_destinations(dsn, qemu_hosts, qemu_vms, save_dir, daemon_factory):
    """Own host, a host that does not exist, a host id given as a string: failed, VM untouched."""
    daemon = start_qemu_daemon(daemon_factory, save_dir)
    vm = qemu_vms("badmig")
    _finished(run_task(dsn, daemon, vm, "create_vm"))
    _finished(run_task(dsn, daemon, vm, "start_vm"))
    before = assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")
    home = before["host_id"]
    missing = max(h.id for h in qemu_hosts) + 1000

    for args, words in (
        ({"host_id": home}, ("own host", f"host {home}")),
        ({"host_id": missing}, (f"host {missing}", "does not exist")),
        ({"host_id": "2"}, ("host_id", "integer", "'2'")),
        ({"host_id": None, "hostid": 2}, ("unknown argument", "hostid")),
    ):
        _failed(run_task(dsn, daemon, vm, "migrate_vm", args), *words)
        after = assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")
        assert after == before, f"a refused migration changed the VM: {before} -> {after}"

    _finished(run_task(dsn, daemon, vm, "poweroff_vm"))
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "stopped")
    assert_all_ended_once(dsn, single_attempt=True)


def test_shutdown_ignored_without_fallback(dsn, qemu_hosts, qemu_vms, save_dir, daemon_factory):
    """The guest ignores ACPI: after shutdown_timeout the task fails and the VM stays running."""
    daemon = start_qemu_daemon(daemon_factory, save_dir)
    vm = qemu_vms("acpi")
    _finished(run_task(dsn, daemon, vm, "create_vm"))
    _finished(run_task(dsn, daemon, vm, "start_vm"))
    before = assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")

    row = _failed(run_task(dsn, daemon, vm, "shutdown_vm"), "did not stop", "still running")
    assert "5 s" in row["message"], row["message"]
    after = assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")
    assert after["host_id"] == before["host_id"] and after["vnc_port"] == before["vnc_port"]

    _finished(run_task(dsn, daemon, vm, "poweroff_vm"))
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "stopped")
    assert vm_row(dsn, vm)["state"] == "stopped"
    assert_all_ended_once(dsn, single_attempt=True)


def test_save_failure_leaves_vm_running(dsn, qemu_hosts, qemu_vms, save_dir, daemon_factory):
    """save_dir missing on the node: save_vm fails at once with libvirt's reason (a missing
    directory is not a transient fault: no retry), and the guest runs on."""
    # A low retry_limit only bounds how long a wrongly retried task takes to end.
    daemon = start_qemu_daemon(daemon_factory, save_dir / "missing", "retry_limit=2")
    vm = qemu_vms("savefail")
    _finished(run_task(dsn, daemon, vm, "create_vm"))
    _finished(run_task(dsn, daemon, vm, "start_vm"))
    before = assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")
    row = run_task(dsn, daemon, vm, "save_vm")
    after = assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")
    assert after == before
    _finished(run_task(dsn, daemon, vm, "poweroff_vm"))
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "stopped")
    _failed(row, "save_vm failed", "No such file or directory")
    assert row["attempts"] == 1, f"a permanent error was retried: {row['attempts']} attempts, {row['message']!r}"


def test_restore_with_lost_image(dsn, qemu_hosts, qemu_vms, save_dir, daemon_factory):
    """The save image vanished from the node: restore_vm fails naming the state, and the VM
    is stopped for good (no host, no stale definition), so start_vm works anywhere."""
    daemon = start_qemu_daemon(daemon_factory, save_dir)
    vm = qemu_vms("lostimg")
    second = qemu_hosts[1].id
    _finished(run_task(dsn, daemon, vm, "create_vm"))
    _finished(run_task(dsn, daemon, vm, "start_vm", {"host_id": second}))
    _finished(run_task(dsn, daemon, vm, "save_vm"))
    row = assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "saved")
    (save_dir / f"taskomatic-vm{vm}-{row['uuid']}.save").unlink()
    _failed(run_task(dsn, daemon, vm, "restore_vm"), "it is stopped", "needs saved")
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "stopped")
    _finished(run_task(dsn, daemon, vm, "start_vm"))
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")
    _finished(run_task(dsn, daemon, vm, "poweroff_vm"))
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "stopped")


def test_start_after_guest_powered_itself_off(dsn, qemu_hosts, qemu_vms, save_dir, daemon_factory):
    """The guest stopped behind the daemon's back (as a guest OS powering off does: the
    domain stays defined, shut off). start_vm runs it again on one host only."""
    daemon = start_qemu_daemon(daemon_factory, save_dir)
    vm = qemu_vms("selfoff")
    second = qemu_hosts[1]
    _finished(run_task(dsn, daemon, vm, "create_vm"))
    _finished(run_task(dsn, daemon, vm, "start_vm", {"host_id": second.id}))
    row = assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")
    conn = libvirt.open(second.uri)
    try:
        conn.lookupByUUIDString(row["uuid"]).destroy()
    finally:
        conn.close()
    _finished(run_task(dsn, daemon, vm, "start_vm"))
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")
    _finished(run_task(dsn, daemon, vm, "poweroff_vm"))
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "stopped")


def test_tasks_after_node_libvirtd_restart(dsn, qemu_hosts, qemu_vms, save_dir, daemon_factory):
    """libvirtd on the VM's node restarts (a package upgrade does that; guests keep running):
    the next task on the VM reconnects and works instead of failing on the dead connection."""
    daemon = start_qemu_daemon(daemon_factory, save_dir)
    vm = qemu_vms("restart")
    first = qemu_hosts[0]
    _finished(run_task(dsn, daemon, vm, "create_vm"))
    _finished(run_task(dsn, daemon, vm, "start_vm", {"host_id": first.id}))
    _finished(run_task(dsn, daemon, vm, "suspend_vm"))  # the shard now holds a connection
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "suspended")
    first.node.restart()
    _finished(run_task(dsn, daemon, vm, "resume_vm"))
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")
    _finished(run_task(dsn, daemon, vm, "poweroff_vm"))
    assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "stopped")


def test_clear_vms_live_migrates_every_guest_off_a_disabled_host(dsn, qemu_hosts, qemu_vms, save_dir,
                                                                  daemon_factory):
    daemon = start_qemu_daemon(daemon_factory, save_dir)
    a, b = qemu_hosts
    vms = [qemu_vms(f"clear{i}") for i in range(2)]
    for vm in vms:
        _finished(run_task(dsn, daemon, vm, "create_vm"))
        _finished(run_task(dsn, daemon, vm, "start_vm", {"host_id": a.id}))
    query(dsn, "UPDATE hosts SET is_disabled = true WHERE id = %s RETURNING id", (a.id,))
    [clear] = checks.insert_tasks(dsn, [("Host", a.id, "clear_vms")])
    row = checks.wait_task_ended(dsn, clear, timeout=240)
    assert row["state"] == "finished", row
    for vm in vms:
        assert_vm_consistent(dsn, vm, qemu_hosts, save_dir, "running")
        assert vm_row(dsn, vm)["host_id"] == b.id
    assert_key_order(dsn)

