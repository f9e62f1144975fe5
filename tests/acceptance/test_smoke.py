"""The daemon runs a short VM lifecycle end to end on a real libvirt node."""

from __future__ import annotations

from tests.helpers import query, wait_for


def test_lifecycle_runs_in_order(dsn, hosts, daemon_factory):
    vm = query(dsn, "INSERT INTO vms (description, memory_allocated) VALUES (%s, 65536) RETURNING id",
               ("smoke-" + dsn.split("dbname=")[1],))[0]["id"]
    for action in ("create_vm", "start_vm", "suspend_vm", "resume_vm", "poweroff_vm"):
        query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action) VALUES ('Vm', %s, %s) "
                   "RETURNING id", (vm, action))
    daemon_factory(shards=2)
    active = "SELECT count(*) AS n FROM tasks WHERE state IN ('queued', 'running')"
    wait_for(lambda: query(dsn, active)[0]["n"] == 0, what="all tasks to end")
    rows = query(dsn, "SELECT action, state, message FROM tasks ORDER BY id")
    assert [r["state"] for r in rows] == ["finished"] * 5, rows
    final = query(dsn, "SELECT state, host_id FROM vms WHERE id = %s", (vm,))[0]
    assert final == {"state": "stopped", "host_id": None}
