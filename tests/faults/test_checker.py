"""The checker itself: it must see each kind of violation it is there to catch.

Rows are written by hand (as a broken daemon could leave them), on a real
database and a real node; each check must name what is wrong, and a clean
run must pass.
"""

from __future__ import annotations

from typing import Any

import libvirt

from tests.faults import checker
from tests.helpers import execute, query

_TASK = ("INSERT INTO tasks (task_target_type, task_target_id, action, state, message, time_started, time_ended, "
         "attempts) VALUES ('Vm', %s, %s, %s, %s, now() + make_interval(secs => %s), "
         "now() + make_interval(secs => %s), %s) RETURNING id")


def task(dsn: str, vm: int, action: str, start: float, end: float, attempts: int = 1, state: str = "finished",
         message: str | None = None) -> int:
    return int(query(dsn, _TASK, (vm, action, state, message, start, end, attempts))[0]["id"])


def test_the_checker_catches_what_it_should(dsn: str, fault_nodes: list[Any]) -> None:
    node = fault_nodes[0]
    [host] = query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                        "VALUES ('n0', %s, 'TEST', 64, 268435456) RETURNING id", (node.test_uri,))
    vms = [r["id"] for r in query(dsn, "INSERT INTO vms (description, memory_allocated, state) "
                                       "VALUES ('a', 65536, 'stopped'), ('b', 65536, 'stopped') RETURNING id")]
    a, b = vms
    task(dsn, a, "create_vm", 0, 1)
    task(dsn, a, "start_vm", 2, 3)
    task(dsn, a, "poweroff_vm", 4, 5)
    assert checker.check_run(dsn, [], {a: "stopped", b: "stopped"}) == []

    # Two tasks of one key overlapping; a later id started first.
    task(dsn, b, "create_vm", 10, 12)
    task(dsn, b, "start_vm", 11, 13)
    found = checker.key_order(dsn)
    assert any("overlap" in v for v in found) and any("out of id order" in v for v in found), found

    # Run twice without a "not started" settlement in any log; with the line, it is allowed.
    rerun = task(dsn, a, "start_vm", 20, 21, attempts=2)
    assert any("ran 2 times" in v for v in checker.reruns(dsn, []))
    line = f"INFO [instance 1 shard 0] x: task {rerun} (start_vm Vm:{a}) reconciled: not_started: interrupted"
    assert checker.reruns(dsn, [line]) == []

    # A task that never ended; one that ended before it started.
    execute(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', %s, 'suspend_vm')", (a,))
    task(dsn, b, "resume_vm", 35, 34)
    assert any("did not end properly" in v for v in checker.ended_once(dsn))

    # A row that says running with no domain; a domain running that the row calls stopped.
    execute(dsn, "UPDATE vms SET state = 'running', host_id = %s WHERE id = %s", (host["id"], a))
    conn = libvirt.open(node.test_uri)
    try:
        uuid = query(dsn, "SELECT uuid::text AS u FROM vms WHERE id = %s", (b,))[0]["u"]
        dom = conn.createXML(f"<domain type='test'><name>b</name><uuid>{uuid}</uuid><memory>65536</memory>"
                             "<os><type>hvm</type></os></domain>", 0)
        found = checker.vm_rows(dsn, {a: "stopped"})
        dom.destroy()
    finally:
        conn.close()
    assert any(f"VM {a} row says running" in v for v in found), found
    assert any(f"VM {b} row says stopped" in v for v in found), found
    assert any(f"VM {a} row says running, its last task implies stopped" in v for v in found), found

    # Work found already done (a twin ran before).
    task(dsn, b, "suspend_vm", 40, 41, message="VM 2 is already suspended; nothing to do")
    assert checker.no_work_found_done(dsn)
