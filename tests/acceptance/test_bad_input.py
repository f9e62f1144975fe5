"""Bad rows inserted with plain SQL fail with a clear message; nothing else is disturbed.

The malformed tasks sit between good tasks on other VMs and on the same VM.
Each bad one must fail saying what is wrong, every good one must finish, no
process of the daemon may die, and the daemon must take new work afterwards.
A VM whose description is full of XML metacharacters is not bad input: it
must work, and stay a name in the domain XML.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import libvirt
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
