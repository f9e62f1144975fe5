"""Bad rows inserted with plain SQL fail with a clear message, or the schema refuses them;
nothing else is disturbed.

The malformed tasks sit between good tasks on other VMs and on the same VM.
Each bad one must fail saying what is wrong, every good one must finish, no
process of the daemon may die, and the daemon must take new work afterwards.
A VM whose description is full of XML metacharacters is not bad input: it
must work, and stay a name in the domain XML.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Any

import libvirt
import psycopg2
import psycopg2.errors
import pytest

from tests.acceptance import checks
from tests.helpers import execute, query

# Key words each failure message must contain (lowercased), by label.
EXPECTED_FAILURES = {
    "unknown action": ("unknown action", "frobnicate_vm"),
    "args array": ("args", "json object", "array"),
    "args string": ("args", "json object", "string"),
    "args number": ("args", "json object", "number"),
    "args null": ("args", "json object", "null"),
    "host_id not a number": ("host_id", "integer", "three"),
    "unknown args key": ("unknown argument", "bogus"),
    "missing host": ("host", "999999", "does not exist"),
    "vm does not exist": ("vm", "987654321", "does not exist"),
    "vm deleted": ("vm", "does not exist"),
    "unknown target type": ("planet",),
    "null target id": ("task_target_id", "null"),
    "impossible state": ("start", "suspended"),
}

WEIRD = "</name><devices><disk type='file'/>&amp;\"' ünïcödé 名前 ✓ \u2013"  # ends with an en dash


@pytest.fixture
def prefix(dsn, libvirt_nodes):
    name = checks.unique_prefix(dsn)
    yield name
    checks.remove_domains([n.test_uri for n in libvirt_nodes], name)


@pytest.mark.slow
def test_bad_rows_fail_clearly_and_disturb_nothing(dsn, hosts, daemon_factory, prefix):
    weird_description = f"{prefix} {WEIRD}"
    a, b, c, d, weird = checks.insert_vms(
        dsn, [f"{prefix}-a", f"{prefix}-b", f"{prefix}-c", f"{prefix}-d", weird_description])

    plan: list[tuple[str | None, tuple]] = [  # (label of a bad task or None, task)
        (None, ("Vm", a, "create_vm")),
        (None, ("Vm", b, "create_vm")),
        ("unknown action", ("Vm", a, "frobnicate_vm")),
        (None, ("Vm", c, "create_vm")),
        (None, ("Vm", d, "create_vm")),
        ("args array", ("Vm", a, "start_vm", [1, 2])),
        (None, ("Vm", weird, "create_vm")),
        (None, ("Vm", a, "start_vm")),
        ("args string", ("Vm", b, "start_vm", "fast")),
        (None, ("Vm", b, "start_vm")),
        ("args number", ("Vm", c, "start_vm", 42)),
        ("host_id not a number", ("Vm", c, "start_vm", {"host_id": "three"})),
        ("missing host", ("Vm", c, "start_vm", {"host_id": 999999})),
        (None, ("Vm", c, "start_vm")),
        ("unknown args key", ("Vm", a, "suspend_vm", {"bogus": 1})),
        (None, ("Vm", a, "suspend_vm")),
        ("args null", ("Vm", b, "poweroff_vm", None)),
        ("vm does not exist", ("Vm", 987654321, "start_vm")),
        ("vm deleted", ("Vm", d, "start_vm")),
        (None, ("Vm", weird, "start_vm")),
        ("unknown target type", ("Planet", b, "start_vm")),
        ("null target id", ("Vm", None, "start_vm")),
        ("impossible state", ("Vm", a, "start_vm")),
        (None, ("Vm", a, "resume_vm")),
        (None, ("Vm", b, "poweroff_vm")),
        (None, ("Vm", c, "suspend_vm")),
    ]
    ids = checks.insert_tasks(dsn, [task for _, task in plan])
    # A VM deleted while its tasks wait in the queue (before the daemon ever sees them).
    execute(dsn, "DELETE FROM vms WHERE id = %s", (d,))

    daemon = daemon_factory(shards=4)
    pids = daemon.child_pids()
    checks.wait_all_ended(dsn, daemon, timeout=120)

    rows = {r["id"]: r for r in query(dsn, "SELECT id, action, state, message FROM tasks")}
    wrong: list[tuple[Any, ...]] = []
    for (label, task), task_id in zip(plan, ids, strict=True):
        row = rows[task_id]
        if label is None:
            if task[1] == d:  # the deleted VM's create_vm: it cannot run either
                if row["state"] != "failed" or "does not exist" not in (row["message"] or "").lower():
                    wrong.append(("create_vm of a deleted VM", row))
            elif row["state"] != "finished":
                wrong.append(("good task did not finish", task, row))
            continue
        message = (row["message"] or "").lower()
        missing = [word for word in EXPECTED_FAILURES[label] if word not in message]
        if row["state"] != "failed" or missing:
            wrong.append((label, task, row, "missing words:", missing))
    assert not wrong, wrong

    checks.assert_all_ended_once(dsn)
    checks.assert_key_order(dsn)
    checks.assert_vms_in_expected_state(dsn, {a: "running", b: "stopped", c: "suspended", weird: "running"})
    checks.assert_vms_match_libvirt(dsn, [a, b, c, weird])

    # The weird name is a name: the XML library escaped it, nothing was injected.
    vm = query(dsn, "SELECT uuid::text AS uuid, host_id, description FROM vms WHERE id = %s", (weird,))[0]
    assert vm["description"] == weird_description
    uri = query(dsn, "SELECT libvirt_uri FROM hosts WHERE id = %s", (vm["host_id"],))[0]["libvirt_uri"]
    conn = libvirt.open(uri)
    try:
        domain = conn.lookupByUUIDString(vm["uuid"])
        assert domain.isActive()
        root = ET.fromstring(domain.XMLDesc(0))
    finally:
        conn.close()
    # libvirt forbids '/' in names, so the daemon maps it to '_'; everything else stays.
    name = root.findtext("name")
    assert name == weird_description.replace("/", "_")
    for fragment in ("<", ">", "&amp;", '"', "'", "ünïcödé", "名前", "✓", "\u2013"):
        assert fragment in name, fragment
    devices = root.find("devices")
    assert devices is not None
    assert devices.findall("disk") == [], ET.tostring(devices, encoding="unicode")
    assert root.findall("name") == [root.find("name")]

    # Still alive, no process died on the way, and it takes new work.
    assert daemon.process.poll() is None
    assert daemon.child_pids() == pids, "a process of the daemon died on bad input"
    [new] = checks.insert_tasks(dsn, [("Vm", c, "resume_vm")])
    row = checks.wait_task_ended(dsn, new, timeout=60)
    assert row["state"] == "finished", row
    checks.assert_vms_match_libvirt(dsn, [c])
    assert daemon.child_pids() == pids


# -- more kinds of wrong: type mismatches, out-of-range values, huge and hostile text ------------------

MB = 1024 * 1024
SHELL = "$(touch /tmp/tkm-pwned); rm -rf ~ | `id` && echo 'q' \"dq\" \\back ünï 名前 ✓"

# label: words the failure message must contain (lowercased)
MORE_FAILURES = {
    "vm action on a pool target": ("action start_vm acts on vm", "not on task_target_type 'storagepool'"),
    "pool action on a vm target": ("action refresh_pool acts on storagepool", "not on task_target_type 'vm'"),
    "host_id 10^30": ("args.host_id", "1 to 9223372036854775807", "got 1000000000000000000000000000000"),
    "host_id negative": ("args.host_id", "got -3", "no host has that id"),
    "host_id float": ("args.host_id must be an integer host id", "1.5"),
    "host_id boolean": ("args.host_id must be an integer host id", "true"),
    "host_id object": ("args.host_id must be an integer host id", "$ne"),
    "host_id numeric string": ("args.host_id must be an integer host id", "'1'"),
    "unicode args key": ("unknown argument", "ключ"),
    "1 mb args value": ("unknown argument", "note"),
    "empty action": ("unknown action ''", "known actions"),
    "shell and xml in action": ("unknown action", "start_vm; rm -rf / <x/>&amp;"),
    "1 mb action name": ("unknown action",),
    "1 mb description create": ("description", "1048576 bytes long", "at most 250 bytes", "shorten"),
    "1 mb description start": ("cannot start", "1048576 characters", "create_failed"),
    "memory 2^62 kb": ("no available, enabled host has 4611686018427387904 kb free memory",),
    "bad mac address": ("start_vm failed on host", "unable to parse mac address", "'; rm -rf / <x>"),
    "pool does not exist": ("refresh_pool", "storage pool 876543 does not exist"),
    "volume does not exist": ("create_volume", "storage volume 876543 does not exist"),
    "volume deleted while queued": ("create_volume", "does not exist"),
    "volume task with args": ("create_volume takes no arguments", "size"),
    "host does not exist": ("host 876543 does not exist",),
    "clear_vms with args": ("unknown argument", "force"),
    "clear_vms on an enabled host": ("is not disabled",),
    "volume '../../etc/passwd'": ("create_volume", "must not contain '/'"),
    "volume '/etc/passwd'": ("create_volume", "must not contain '/'"),
    "volume '..'": ("create_volume", "'..'", "not allowed"),
    "volume '.'": ("create_volume", "'.'", "not allowed"),
    "volume '..hidden'": ("create_volume", "must not start with '..'"),
    "volume with a newline": ("create_volume", "control character"),
    "volume name of 300 bytes": ("create_volume", "300 bytes long", "255"),
    "volume size 0": ("create_volume", "size must be greater than 0 kb"),
    "volume size 2^62 kb": ("create_volume", "larger than the maximum"),
    "delete volume '../../etc/passwd'": ("delete_volume", "must not contain '/'", "no such volume can exist"),
}


@pytest.mark.slow
def test_more_bad_rows_fail_clearly_and_disturb_nothing(dsn, hosts, daemon_factory, prefix):
    e, f, big, huge, shell, mac = checks.insert_vms(
        dsn, [f"{prefix}-e", f"{prefix}-f", f"{prefix}-big " + "x" * (MB - len(prefix) - 5),
              f"{prefix}-huge", f"{prefix} {SHELL}", f"{prefix}-mac"])
    execute(dsn, "UPDATE vms SET memory_allocated = %s WHERE id = %s", (2**62, huge))
    execute(dsn, "UPDATE vms SET vnic_mac_addr = %s WHERE id = %s", ("'; rm -rf / <x>", mac))
    pool = query(dsn, "INSERT INTO storage_pools (name, pool_type, target_path) "
                      "VALUES (%s, 'dir', '/nonexistent/tkm') RETURNING id", (f"{prefix}-pool",))[0]["id"]
    names = ["../../etc/passwd", "/etc/passwd", "..", ".", "..hidden", "new\nline", "n" * 300, "zero",
             "too-big", "deleted-while-queued"]
    sizes = {"zero": 0, "too-big": 2**62}
    vol = {name: query(dsn, "INSERT INTO storage_volumes (storage_pool_id, name, size) VALUES (%s, %s, %s) "
                            "RETURNING id", (pool, name, sizes.get(name, 1024)))[0]["id"] for name in names}

    plan: list[tuple[str | None, tuple]] = [
        (None, ("Vm", e, "create_vm")),
        ("vm action on a pool target", ("StoragePool", e, "start_vm")),
        ("pool action on a vm target", ("Vm", e, "refresh_pool")),
        ("host_id 10^30", ("Vm", e, "start_vm", {"host_id": 10**30})),
        ("host_id negative", ("Vm", e, "start_vm", {"host_id": -3})),
        (None, ("Vm", f, "create_vm")),
        ("host_id float", ("Vm", e, "start_vm", {"host_id": 1.5})),
        ("host_id boolean", ("Vm", e, "start_vm", {"host_id": True})),
        ("host_id object", ("Vm", e, "start_vm", {"host_id": {"$ne": None}})),
        ("host_id numeric string", ("Vm", e, "start_vm", {"host_id": "1"})),
        (None, ("Vm", e, "start_vm")),  # the same VM, after its bad rows
        ("unicode args key", ("Vm", f, "start_vm", {"ключ": 1})),
        ("1 mb args value", ("Vm", f, "start_vm", {"note": "n" * MB})),
        ("empty action", ("Vm", f, "")),
        ("shell and xml in action", ("Vm", f, "start_vm; rm -rf / <x/>&amp;")),
        ("1 mb action name", ("Vm", f, "a" * MB)),
        (None, ("Vm", f, "start_vm")),
        ("1 mb description create", ("Vm", big, "create_vm")),
        ("1 mb description start", ("Vm", big, "start_vm")),
        (None, ("Vm", huge, "create_vm")),  # a huge memory size is only a number until placement
        ("memory 2^62 kb", ("Vm", huge, "start_vm")),
        (None, ("Vm", shell, "create_vm")),
        (None, ("Vm", shell, "start_vm")),
        (None, ("Vm", mac, "create_vm")),
        ("bad mac address", ("Vm", mac, "start_vm")),
        ("pool does not exist", ("StoragePool", 876543, "refresh_pool")),
        ("volume does not exist", ("StorageVolume", 876543, "create_volume")),
        ("volume deleted while queued", ("StorageVolume", vol["deleted-while-queued"], "create_volume")),
        ("volume task with args", ("StorageVolume", vol["zero"], "create_volume", {"size": -1})),
        ("host does not exist", ("Host", 876543, "clear_vms")),
        ("clear_vms with args", ("Host", hosts[0], "clear_vms", {"force": True})),
        ("clear_vms on an enabled host", ("Host", hosts[0], "clear_vms")),
        ("volume '../../etc/passwd'", ("StorageVolume", vol["../../etc/passwd"], "create_volume")),
        ("volume '/etc/passwd'", ("StorageVolume", vol["/etc/passwd"], "create_volume")),
        ("volume '..'", ("StorageVolume", vol[".."], "create_volume")),
        ("volume '.'", ("StorageVolume", vol["."], "create_volume")),
        ("volume '..hidden'", ("StorageVolume", vol["..hidden"], "create_volume")),
        ("volume with a newline", ("StorageVolume", vol["new\nline"], "create_volume")),
        ("volume name of 300 bytes", ("StorageVolume", vol["n" * 300], "create_volume")),
        ("volume size 0", ("StorageVolume", vol["zero"], "create_volume")),
        ("volume size 2^62 kb", ("StorageVolume", vol["too-big"], "create_volume")),
        ("delete volume '../../etc/passwd'", ("StorageVolume", vol["../../etc/passwd"], "delete_volume")),
        (None, ("Vm", e, "suspend_vm")),
        (None, ("Vm", f, "poweroff_vm")),
    ]
    ids = checks.insert_tasks(dsn, [task for _, task in plan])
    execute(dsn, "DELETE FROM storage_volumes WHERE id = %s", (vol["deleted-while-queued"],))

    daemon = daemon_factory(shards=4)
    pids = daemon.child_pids()
    checks.wait_all_ended(dsn, daemon, timeout=120)

    rows = {r["id"]: r for r in query(dsn, "SELECT id, action, state, message FROM tasks")}
    wrong: list[tuple[Any, ...]] = []
    for (label, task), task_id in zip(plan, ids, strict=True):
        row = rows[task_id]
        if label is None:
            if row["state"] != "finished":
                wrong.append(("good task did not finish", task, row["state"], (row["message"] or "")[:300]))
            continue
        message = (row["message"] or "").lower()
        missing = [word for word in MORE_FAILURES[label] if word not in message]
        if row["state"] != "failed" or missing:
            wrong.append((label, row["state"], message[:300], "missing words:", missing))
        # A message quotes what is wrong; it does not copy megabytes of it (the 1 MB action name aside:
        # its message is the shard's, runtime/shard.py _check).
        if label != "1 mb action name" and len(message) > 2000:
            wrong.append((label, f"message of {len(message)} characters"))
    assert not wrong, wrong

    checks.assert_all_ended_once(dsn)
    checks.assert_key_order(dsn)
    checks.assert_vms_in_expected_state(dsn, {e: "suspended", f: "stopped", shell: "running"})
    checks.assert_vms_match_libvirt(dsn, [e, f, shell])
    state = {r["id"]: r["state"] for r in query(dsn, "SELECT id, state FROM vms WHERE id = ANY(%s)",
                                                 ([big, huge],))}
    assert state == {big: "create_failed", huge: "stopped"}, state
    checks.assert_vms_in_expected_state(dsn, {mac: "stopped"})
    checks.assert_vms_match_libvirt(dsn, [mac])  # no half-defined domain left behind

    # Shell metacharacters are a name like any other: the domain has exactly that name, nothing ran.
    vm = query(dsn, "SELECT v.uuid::text AS uuid, h.libvirt_uri FROM vms v JOIN hosts h ON h.id = v.host_id "
                    "WHERE v.id = %s", (shell,))[0]
    conn = libvirt.open(vm["libvirt_uri"])
    try:
        # ("/" is the one character libvirt forbids in a name: the daemon maps it to "_".)
        assert conn.lookupByUUIDString(vm["uuid"]).name() == f"{prefix} {SHELL}".replace("/", "_")
    finally:
        conn.close()
    assert not os.path.exists("/tmp/tkm-pwned")
    # No volume row with a bad name changed state; the one deleted while queued stays deleted.
    volumes = {r["name"]: r["state"] for r in query(
        dsn, "SELECT name, state FROM storage_volumes WHERE storage_pool_id = %s", (pool,))}
    assert volumes == {name: "pending_setup" for name in names if name != "deleted-while-queued"}, volumes

    assert daemon.process.poll() is None
    assert daemon.child_pids() == pids, "a process of the daemon died on bad input"
    [new] = checks.insert_tasks(dsn, [("Vm", f, "start_vm")])
    row = checks.wait_task_ended(dsn, new, timeout=60)
    assert row["state"] == "finished", row


# -- what the schema itself refuses: the INSERT fails, naming the column or the constraint ------------

# label: (table, column values, error class, column or constraint the error must name)
REFUSED_INSERTS = {
    "task without action": ("tasks", {"task_target_type": "Vm", "task_target_id": 1, "action": None},
                            psycopg2.errors.NotNullViolation, "action"),
    "task without target type": ("tasks", {"task_target_type": None, "task_target_id": 1, "action": "start_vm"},
                                 psycopg2.errors.NotNullViolation, "task_target_type"),
    "task with NULL args": ("tasks", {"task_target_type": "Vm", "task_target_id": 1, "action": "start_vm",
                                      "args": None}, psycopg2.errors.NotNullViolation, "args"),
    "task with NULL state": ("tasks", {"task_target_type": "Vm", "task_target_id": 1, "action": "start_vm",
                                       "state": None}, psycopg2.errors.NotNullViolation, "state"),
    "task in an unknown state": ("tasks", {"task_target_type": "Vm", "task_target_id": 1, "action": "start_vm",
                                           "state": "done"}, psycopg2.errors.CheckViolation, "tasks_state_known"),
    "failed task without message": ("tasks", {"task_target_type": "Vm", "task_target_id": 1, "action": "start_vm",
                                              "state": "failed"}, psycopg2.errors.CheckViolation,
                                    "tasks_failed_needs_message"),
    "vm without description": ("vms", {"description": None}, psycopg2.errors.NotNullViolation, "description"),
    "vm with negative memory": ("vms", {"description": "x", "memory_allocated": -1},
                                psycopg2.errors.CheckViolation, "vms_memory_positive"),
    "vm with no vcpus": ("vms", {"description": "x", "num_vcpus_allocated": 0},
                         psycopg2.errors.CheckViolation, "vms_vcpus_positive"),
    "vm in an unknown state": ("vms", {"description": "x", "state": "flying"},
                               psycopg2.errors.CheckViolation, "vms_state_known"),
    "vm booting from a floppy": ("vms", {"description": "x", "boot_device": "floppy"},
                                 psycopg2.errors.CheckViolation, "vms_boot_device_known"),
    "vm on a host that does not exist": ("vms", {"description": "x", "host_id": 987654},
                                         psycopg2.errors.ForeignKeyViolation, "vms_host_id_fkey"),
    "host of an unknown hypervisor": ("hosts", {"hostname": "h", "libvirt_uri": "test:///default",
                                                "hypervisor_type": "XEN"},
                                      psycopg2.errors.CheckViolation, "hosts_hypervisor_type_known"),
    "host with negative memory": ("hosts", {"hostname": "h", "libvirt_uri": "test:///default", "memory": -1},
                                  psycopg2.errors.CheckViolation, "hosts_memory_not_negative"),
    "host without uri": ("hosts", {"hostname": "h", "libvirt_uri": None},
                         psycopg2.errors.NotNullViolation, "libvirt_uri"),
    "pool of an unknown type": ("storage_pools", {"name": "p", "pool_type": "zfs"},
                                psycopg2.errors.CheckViolation, "storage_pools_type_known"),
    "volume of negative size": ("storage_volumes", {"storage_pool_id": "POOL", "name": "v", "size": -1},
                                psycopg2.errors.CheckViolation, "storage_volumes_size_not_negative"),
    "volume without name": ("storage_volumes", {"storage_pool_id": "POOL", "name": None},
                            psycopg2.errors.NotNullViolation, "name"),
    "volume in a pool that does not exist": ("storage_volumes", {"storage_pool_id": 987654, "name": "v"},
                                             psycopg2.errors.ForeignKeyViolation,
                                             "storage_volumes_storage_pool_id_fkey"),
}


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(REFUSED_INSERTS))
def test_the_schema_refuses_rows_that_break_it_naming_the_rule(dsn, label):
    table, values, error, name = REFUSED_INSERTS[label]
    if "POOL" in values.values():
        pool = query(dsn, "INSERT INTO storage_pools (name) VALUES ('p') RETURNING id")[0]["id"]
        values = {k: pool if v == "POOL" else v for k, v in values.items()}
    columns = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    with pytest.raises(error) as info:
        execute(dsn, f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(values.values()))
    diag = info.value.diag
    assert name in (diag.constraint_name, diag.column_name), (diag.constraint_name, diag.column_name)
    assert name in str(info.value)


@pytest.mark.parametrize(("sql", "error"), [
    ("INSERT INTO vms (description, memory_allocated) VALUES ('x', 1000000000000000000000000000000)",
     psycopg2.errors.NumericValueOutOfRange),
    ("INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', 'three', 'start_vm')",
     psycopg2.errors.InvalidTextRepresentation),
    ("INSERT INTO tasks (task_target_type, task_target_id, action, args) VALUES ('Vm', 1, 'start_vm', '{oops')",
     psycopg2.errors.InvalidTextRepresentation),
    ("INSERT INTO tasks (task_target_type, task_target_id, action, args) "
     "VALUES ('Vm', 1, 'start_vm', '{\"a\": \"\\u0000\"}')", psycopg2.errors.UntranslatableCharacter),
    ("INSERT INTO storage_volumes (storage_pool_id, name) SELECT id, 'a' || chr(0) || 'b' FROM storage_pools",
     psycopg2.errors.ProgramLimitExceeded),
], ids=["memory 10^30", "target id 'three'", "args not JSON", "NUL in args", "NUL in a volume name"])
@pytest.mark.slow
def test_values_the_column_types_cannot_hold_are_refused(dsn, sql, error):
    query(dsn, "INSERT INTO storage_pools (name) VALUES ('p')")
    with pytest.raises(error):
        execute(dsn, sql)
    # A NUL cannot even be sent as a parameter: the client refuses it first.
    with pytest.raises(ValueError, match="NUL"):
        execute(dsn, "INSERT INTO storage_volumes (storage_pool_id, name) SELECT id, %s FROM storage_pools",
                ("a\0b",))
    assert query(dsn, "SELECT count(*) AS n FROM storage_volumes")[0]["n"] == 0


@pytest.mark.parametrize("state", ["running", "paused"])
def test_a_task_inserted_already_running_is_refused(dsn, state):
    with pytest.raises(psycopg2.IntegrityError, match="tasks_unclaimed_running"):
        execute(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, state) "
                     "VALUES ('Vm', 1, 'start_vm', %s)", (state,))


@pytest.mark.slow
def test_a_huge_action_name_gives_a_short_message(dsn, hosts, daemon_factory, prefix):
    vm, = checks.insert_vms(dsn, [f"{prefix}-long-action"])
    [task] = checks.insert_tasks(dsn, [("Vm", vm, "a" * MB)])
    daemon = daemon_factory(shards=1)
    row = checks.wait_task_ended(dsn, task, timeout=60)
    assert row["state"] == "failed" and "unknown action" in row["message"]
    assert len(row["message"]) < 2000, f"a message of {len(row['message'])} characters"
    assert max(len(line) for line in daemon.log().splitlines()) < 4000
