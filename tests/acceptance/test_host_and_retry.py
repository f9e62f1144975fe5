"""clear_vms empties a disabled host through per-VM migrations; transient node
failures are retried with backoff while the key's later tasks wait and other
keys go on."""

from __future__ import annotations

import libvirt
import pytest

from taskomatic.embedded.libvirtd import ManagedNode
from tests.acceptance import checks
from tests.helpers import query, wait_for

# Slow (not in the inner loop): migrations and retries with back-off on real nodes.
pytestmark = pytest.mark.slow


def _domain_hosts(dsn: str, vm_ids: list[int]) -> dict[int, set[int]]:
    """For each VM, the hosts whose libvirt has its domain."""
    found: dict[int, set[int]] = {vm: set() for vm in vm_ids}
    for host in query(dsn, "SELECT id, libvirt_uri FROM hosts"):
        conn = libvirt.open(host["libvirt_uri"])
        try:
            for vm in query(dsn, "SELECT id, uuid::text AS uuid FROM vms WHERE id = ANY(%s)", (vm_ids,)):
                try:
                    conn.lookupByUUIDString(vm["uuid"])
                    found[vm["id"]].add(host["id"])
                except libvirt.libvirtError:
                    pass
        finally:
            conn.close()
    return found


def test_clear_vms_migrates_every_vm_off_a_disabled_host(dsn, hosts, daemon_factory):
    prefix = checks.unique_prefix(dsn)
    source, destination = hosts
    vm_ids = checks.insert_vms(dsn, [f"{prefix}-clear-{i}" for i in range(8)])
    checks.insert_tasks(dsn, [("Vm", vm, "create_vm") for vm in vm_ids])
    checks.insert_tasks(dsn, [("Vm", vm, "start_vm", {"host_id": source}) for vm in vm_ids])
    daemon = daemon_factory(shards=3)
    checks.wait_all_ended(dsn, daemon)
    assert checks.counts(dsn) == {"finished": 16}

    query(dsn, "UPDATE hosts SET is_disabled = true WHERE id = %s RETURNING id", (source,))
    # A task of VM 0 queued before clear_vms must run before that VM's migration.
    [suspend] = checks.insert_tasks(dsn, [("Vm", vm_ids[0], "suspend_vm")])
    [resume] = checks.insert_tasks(dsn, [("Vm", vm_ids[0], "resume_vm")])
    [clear] = checks.insert_tasks(dsn, [("Host", source, "clear_vms")])
    row = checks.wait_task_ended(dsn, clear, timeout=120)
    assert row["state"] == "finished", row

    children = query(dsn, "SELECT id, task_target_id, action, state FROM tasks WHERE parent_task_id = %s "
                          "ORDER BY id", (clear,))
    assert sorted(c["task_target_id"] for c in children) == sorted(vm_ids)
    assert {c["action"] for c in children} == {"evacuate_vm"} and {c["state"] for c in children} == {"finished"}
    first_child = next(c["id"] for c in children if c["task_target_id"] == vm_ids[0])
    times = {r["id"]: r for r in query(dsn, "SELECT id, time_started, time_ended FROM tasks WHERE id = ANY(%s)",
                                       ([suspend, resume, first_child],))}
    assert times[suspend]["time_ended"] <= times[resume]["time_started"]
    assert times[resume]["time_ended"] <= times[first_child]["time_started"]
    # The host task ended only after its last migration did.
    last_end = max(r["time_ended"] for r in query(dsn, "SELECT time_ended FROM tasks WHERE parent_task_id = %s",
                                                  (clear,)))
    assert query(dsn, "SELECT time_ended FROM tasks WHERE id = %s", (clear,))[0]["time_ended"] >= last_end

    rows = query(dsn, "SELECT id, state, host_id FROM vms WHERE id = ANY(%s)", (vm_ids,))
    assert {(r["state"], r["host_id"]) for r in rows} == {("running", destination)}
    assert _domain_hosts(dsn, vm_ids) == {vm: {destination} for vm in vm_ids}
    checks.assert_key_order(dsn)
    checks.assert_vms_match_libvirt(dsn, vm_ids)


def test_clear_vms_fails_naming_the_vm_that_could_not_move(dsn, hosts, daemon_factory):
    """A paused VM moves and stays paused; a VM whose disk is on a pool local to the host cannot
    move: the task fails naming that VM and why, after moving the others."""
    prefix = checks.unique_prefix(dsn)
    source, destination = hosts
    paused, stuck = checks.insert_vms(dsn, [f"{prefix}-paused", f"{prefix}-stuck"])
    pool = query(dsn, "INSERT INTO storage_pools (name, pool_type, target_path, state, host_id) "
                      "VALUES (%s, 'dir', %s, 'available', %s) RETURNING id",
                 (f"{prefix}-local", f"/tmp/{prefix}-local", source))[0]["id"]
    volume = query(dsn, "INSERT INTO storage_volumes (storage_pool_id, name, size, path, state) "
                        "VALUES (%s, 'root.img', 1024, %s, 'available') RETURNING id",
                   (pool, f"/tmp/{prefix}-local/root.img"))[0]["id"]
    query(dsn, "INSERT INTO vm_disks (vm_id, storage_volume_id) VALUES (%s, %s) RETURNING vm_id", (stuck, volume))
    checks.insert_tasks(dsn, [("Vm", vm, "create_vm") for vm in (paused, stuck)])
    checks.insert_tasks(dsn, [("Vm", paused, "start_vm", {"host_id": source}), ("Vm", paused, "suspend_vm")])
    daemon = daemon_factory(shards=2)
    checks.wait_all_ended(dsn, daemon)
    # The source now has less free memory, so placement by load alone would pick the other host:
    # the disk on the source's local pool decides.
    checks.insert_tasks(dsn, [("Vm", stuck, "start_vm")])
    checks.wait_all_ended(dsn, daemon)
    assert checks.counts(dsn) == {"finished": 5}
    assert query(dsn, "SELECT host_id FROM vms WHERE id = %s", (stuck,))[0]["host_id"] == source
    query(dsn, "UPDATE hosts SET is_disabled = true WHERE id = %s RETURNING id", (source,))
    [clear] = checks.insert_tasks(dsn, [("Host", source, "clear_vms")])
    row = checks.wait_task_ended(dsn, clear, timeout=120)
    assert row["state"] == "failed", row
    assert "1 of 2" in row["message"] and f"Vm {stuck}" in row["message"], row["message"]
    assert "local storage" in row["message"] and f"{prefix}-local" in row["message"], row["message"]
    rows = {r["id"]: r for r in query(dsn, "SELECT id, state, host_id FROM vms WHERE id = ANY(%s)",
                                      ([paused, stuck],))}
    assert (rows[paused]["state"], rows[paused]["host_id"]) == ("suspended", destination)
    assert (rows[stuck]["state"], rows[stuck]["host_id"]) == ("running", source)
    checks.assert_vms_match_libvirt(dsn, [paused, stuck])


def test_clear_vms_leaves_a_saved_vm_when_save_dir_is_not_shared(dsn, hosts, state_dir, daemon_factory):
    """save_dir_shared off (the default): the saved VM stays, named in the finished task's message;
    the running one moves."""
    prefix = checks.unique_prefix(dsn)
    source, destination = hosts
    save_dir = state_dir / "save"
    save_dir.mkdir(mode=0o777)
    save_dir.chmod(0o777)
    state_dir.chmod(0o755)
    moving, saved = checks.insert_vms(dsn, [f"{prefix}-moving", f"{prefix}-saved"])
    checks.insert_tasks(dsn, [("Vm", vm, action, *([{"host_id": source}] if action == "start_vm" else []))
                              for vm in (moving, saved) for action in ("create_vm", "start_vm")])
    checks.insert_tasks(dsn, [("Vm", saved, "save_vm")])
    daemon = daemon_factory(shards=2, extra=["--set", f"save_dir={save_dir}"])
    checks.wait_all_ended(dsn, daemon)
    assert checks.counts(dsn) == {"finished": 5}, query(dsn, "SELECT action, message FROM tasks")
    query(dsn, "UPDATE hosts SET is_disabled = true WHERE id = %s RETURNING id", (source,))
    [clear] = checks.insert_tasks(dsn, [("Host", source, "clear_vms")])
    row = checks.wait_task_ended(dsn, clear, timeout=120)
    assert row["state"] == "finished", row
    assert f"VM {saved} " in row["message"] and "stays on host" in row["message"], row["message"]
    assert "save_dir_shared" in row["message"], row["message"]
    rows = {r["id"]: r for r in query(dsn, "SELECT id, state, host_id FROM vms WHERE id = ANY(%s)",
                                      ([moving, saved],))}
    assert (rows[moving]["state"], rows[moving]["host_id"]) == ("running", destination)
    assert (rows[saved]["state"], rows[saved]["host_id"]) == ("saved", source)


def test_clear_vms_refuses_an_enabled_host(dsn, hosts, daemon_factory):
    [clear] = checks.insert_tasks(dsn, [("Host", hosts[0], "clear_vms")])
    daemon_factory(shards=1)
    row = checks.wait_task_ended(dsn, clear)
    assert row["state"] == "failed" and "not disabled" in row["message"], row


def test_unreachable_node_is_retried_while_other_keys_go_on(dsn, state_dir, daemon_factory):
    """A node that is down when the task starts and comes back: the task waits and then works."""
    prefix = checks.unique_prefix(dsn)
    state_dir.chmod(0o755)
    node = ManagedNode(state_dir / "late-node", "late")  # not started yet: connection refused
    try:
        host = query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                          "VALUES ('late', %s, 'TEST', 8, 8388608) RETURNING id", (node.test_uri,))[0]["id"]
        late_vm, other_vm = checks.insert_vms(dsn, [f"{prefix}-late", f"{prefix}-other"])
        checks.insert_tasks(dsn, [("Vm", late_vm, "create_vm"), ("Vm", other_vm, "create_vm")])
        [start, then] = checks.insert_tasks(dsn, [("Vm", late_vm, "start_vm", {"host_id": host}),
                                                  ("Vm", late_vm, "suspend_vm")])
        daemon = daemon_factory(shards=1, extra=["--set", "retry_backoff_max=2", "--set", "retry_limit=30"])
        wait_for(lambda: f"task {start} (start_vm" in daemon.log() and "retrying in" in daemon.log(),
                 60, what="the first transient failure")
        # The same shard goes on with another VM while this key waits.
        [other] = checks.insert_tasks(dsn, [("Vm", other_vm, "create_vm")])
        assert checks.wait_task_ended(dsn, other)["state"] == "finished"
        assert query(dsn, "SELECT state FROM tasks WHERE id = %s", (then,))[0]["state"] == "queued"

        node.start()
        assert checks.wait_task_ended(dsn, start, timeout=90)["state"] == "finished"
        assert checks.wait_task_ended(dsn, then, timeout=60)["state"] == "finished"
        checks.assert_key_order(dsn)
        checks.assert_vms_match_libvirt(dsn, [late_vm])
    finally:
        node.stop()


def test_a_node_that_stays_down_fails_the_task_after_the_retry_limit(dsn, state_dir, daemon_factory):
    prefix = checks.unique_prefix(dsn)
    host = query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                      "VALUES ('gone', %s, 'TEST', 8, 8388608) RETURNING id",
                 (f"test+unix:///default?socket={state_dir}/no-such-socket",))[0]["id"]
    [vm] = checks.insert_vms(dsn, [f"{prefix}-gone"])
    checks.insert_tasks(dsn, [("Vm", vm, "create_vm")])
    [start, after] = checks.insert_tasks(dsn, [("Vm", vm, "start_vm", {"host_id": host}),
                                               ("Vm", vm, "poweroff_vm")])
    daemon_factory(shards=1, extra=["--set", "retry_limit=2", "--set", "retry_backoff_max=1"])
    row = checks.wait_task_ended(dsn, start, timeout=60)
    assert row["state"] == "failed"
    # Refused connections, or (once the host-status pass has marked the host) an unavailable host.
    assert "gave up after 3 transient failures" in row["message"], row
    assert "unreachable" in row["message"] or "unavailable" in row["message"], row
    # The VM's next task ran only after that. If the start never got past placement the VM is
    # simply stopped (nothing to do); if it did, its row points at the dead node (which fails too).
    later = checks.wait_task_ended(dsn, after, timeout=60)
    assert later["time_started"] >= row["time_ended"]
    assert ((later["state"], "nothing to do" in (later["message"] or "")) == ("finished", True)
            or (later["state"] == "failed" and "unreachable" in later["message"])), later
    checks.assert_key_order(dsn)
