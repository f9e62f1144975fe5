"""A task interrupted by a node crash, settled "neither", must not leave its VM on that host;
nor may a task that failed because its guest died under it (the second test).

Found by the node_kill fault (issue 19, ``test_node_killed[seed22]``, multihost): VM 9's
``resume_vm`` was marked running, its node's libvirtd was killed during the libvirt call
(test-driver state is lost with it), the call failed as transient, and the retry settled
the task by reconciliation against the restarted, empty node: "found VM stopped, neither
suspended nor running (no domain)". The settlement wrote ``state = stopped`` but kept
``host_id``; the host-status pass then saw row and node agree ("stopped") and never
cleared it, so the row named a host that has no domain for it.

The fault suite hits that window only when the kill lands between ``mark_running`` and
the end of the libvirt call; here the interleaving is injected: each action is driven
the way a shard drives it (prepare, mark running + begin, perform, record the outcome
with its row updates), the node is killed right after the task was marked running, and
the settlement is recorded as the shard records it. Real PostgreSQL, real libvirtd
nodes (the test driver behind them); the verdict is the fault suite's own checker,
after a host-status pass had its chance to correct the row.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from psycopg2.extras import Json

from taskomatic.actions.base import Action, ActionContext, Plan, Settlement, TaskRetry
from taskomatic.actions.connections import LibvirtConnections
from taskomatic.actions.registry import load_actions
from taskomatic.config import Config
from taskomatic.db.store import Store
from taskomatic.model import TaskRow
from taskomatic.runtime.reconciler import reconcile_once
from tests.faults import checker
from tests.helpers import query

ACTIONS: dict[str, Action] = load_actions()


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Shardlike:
    """One shard's steps, one at a time, so a fault fits between any two of them."""

    dsn: str
    store: Store
    ctx: ActionContext
    instance_id: int

    def submit(self, vm_id: int, action: str, args: dict[str, Any] | None = None) -> TaskRow:
        row = query(self.dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by) "
                              "VALUES ('Vm', %s, %s, %s, 'test') RETURNING id, key_type, key_id",
                    (vm_id, action, Json(args or {})))[0]
        query(self.dsn, "UPDATE tasks SET claimed_by = %s, claimed_at = clock_timestamp() WHERE id = %s",
              (self.instance_id, row["id"]))
        return TaskRow(row["id"], "Vm", vm_id, action, args or {}, row["key_type"], row["key_id"], "queued")

    def begin(self, task: TaskRow) -> Plan:
        """prepare, then mark running + plan.begin in one transaction (the row's transient state)."""
        plan = ACTIONS[task.action].prepare(self.ctx, task)
        self.store.rollback()
        assert plan.already_done is None, plan.already_done
        with self.store.transaction():
            assert self.store.one("mark_running", shard=0, task_ids=[task.id], instance_id=self.instance_id,
                                  time_started=_now()) is not None
            plan.begin(self.store)
        return plan

    def record(self, task: TaskRow, state: str, message: str | None, updates: list[Any]) -> None:
        with self.store.transaction():
            assert self.store.one("record_outcome", task_id=task.id, instance_id=self.instance_id, state=state,
                                  message=message, time_started=None, time_ended=_now()) is not None
            for update in updates:
                self.store.update_row(update.table, update.row_id, update.values)

    def run(self, vm_id: int, action: str, args: dict[str, Any] | None = None) -> None:
        task = self.submit(vm_id, action, args)
        plan = self.begin(task)
        outcome = ACTIONS[action].perform(self.ctx, plan)
        self.store.rollback()
        assert outcome.state == "finished", outcome.message
        self.record(task, outcome.state, outcome.message, outcome.row_updates)

    def settle_interrupted(self, task: TaskRow) -> str:
        """What the shard does with a task left running: reconcile, record; the settlement's message."""
        settled = ACTIONS[task.action].reconcile(self.ctx, replace(task, state="running"))
        self.store.rollback()
        assert settled.kind == Settlement.NEITHER, settled
        self.record(task, "failed", settled.message, settled.row_updates)
        return settled.message


@pytest.fixture
def shard(dsn: str) -> Iterator[Shardlike]:
    store = Store.open(dsn, "test_reconciled_rows", timeout=10)
    with store.transaction():
        instance_id = store.scalar("register_instance", hostname="testhost", pid=os.getpid(), version="test",
                                   mode="standalone", shards=1, lease=None)
    connections = LibvirtConnections(keepalive_interval=1, keepalive_count=2)
    try:
        yield Shardlike(dsn, store, ActionContext(store, Config(dsn=dsn), connections), int(instance_id))
    finally:
        connections.close_all()
        store.close()


def _hosts(dsn: str, nodes: list[Any]) -> list[int]:
    return [query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                       "VALUES (%s, %s, 'TEST', 64, 268435456) RETURNING id", (f"n{i}", node.test_uri))[0]["id"]
            for i, node in enumerate(nodes)]


def _vm_on(shard: Shardlike, host_id: int, name: str) -> int:
    """A VM started on ``host_id`` (start_vm with args.host_id, as a shard runs it)."""
    vm_id = query(shard.dsn, "INSERT INTO vms (description, state, num_vcpus_allocated, memory_allocated) "
                             "VALUES (%s, 'stopped', 1, 65536) RETURNING id", (name,))[0]["id"]
    shard.run(vm_id, "start_vm", {"host_id": host_id})
    return int(vm_id)


def _host_status_pass(shard: Shardlike) -> None:
    reconcile_once(shard.store, shard.ctx.libvirt)
    shard.store.rollback()


def _row(dsn: str, vm_id: int) -> dict[str, Any]:
    return query(dsn, "SELECT state, host_id FROM vms WHERE id = %s", (vm_id,))[0]


def test_resume_interrupted_by_a_node_crash_leaves_no_host(dsn: str, fault_nodes: list[Any],
                                                          shard: Shardlike) -> None:
    victim, _other = fault_nodes
    host, _ = _hosts(dsn, fault_nodes)
    vm_id = _vm_on(shard, host, "seed22")
    shard.run(vm_id, "suspend_vm")
    task = shard.submit(vm_id, "resume_vm")
    plan = shard.begin(task)
    assert _row(dsn, vm_id) == {"state": "resuming", "host_id": host}
    # The interleaving: the node dies while the task is running (its test-driver domains with it).
    victim.kill()
    with pytest.raises(TaskRetry):
        ACTIONS["resume_vm"].perform(shard.ctx, plan)  # the shard parks it; the retry reconciles
    shard.store.rollback()
    victim.start()
    message = shard.settle_interrupted(task)
    assert "neither suspended nor running" in message and "no domain" in message
    _host_status_pass(shard)
    assert _row(dsn, vm_id) == {"state": "stopped", "host_id": None}
    assert checker.vm_rows(dsn) == []


def test_migrate_interrupted_by_a_source_crash_leaves_no_host(dsn: str, fault_nodes: list[Any],
                                                              shard: Shardlike) -> None:
    victim, _other = fault_nodes
    source, target = _hosts(dsn, fault_nodes)
    vm_id = _vm_on(shard, source, "migrating")
    task = shard.submit(vm_id, "migrate_vm", {"host_id": target})
    shard.begin(task)
    assert _row(dsn, vm_id) == {"state": "migrating", "host_id": source}
    # The source node dies before the domain reached the target: it is nowhere now.
    victim.kill()
    victim.start()
    message = shard.settle_interrupted(task)
    assert "stopped" in message and "no domain" in message
    _host_status_pass(shard)
    assert _row(dsn, vm_id) == {"state": "stopped", "host_id": None}
    assert checker.vm_rows(dsn) == []


def test_resume_failing_on_a_guest_killed_under_it_leaves_no_host(dsn: str, fault_nodes: list[Any],
                                                                  shard: Shardlike) -> None:
    # Found by the qemu_node fault (seed 8): the guest's QEMU was killed -9 during resume_vm;
    # the call failed ("Unable to read from monitor"), the domain stayed defined and shut off,
    # and the failure wrote state=stopped but kept host_id (row and node then agree on
    # 'stopped', so the host-status pass never cleared it). Here the guest is stopped behind
    # taskomatic's back between mark_running and the libvirt call; the definition stays.
    host, _ = _hosts(dsn, fault_nodes)
    vm_id = _vm_on(shard, host, "guest-killed")
    shard.run(vm_id, "suspend_vm")
    task = shard.submit(vm_id, "resume_vm")
    plan = shard.begin(task)
    plan.data["observed"].domain.destroy()  # the guest dies; libvirt keeps its persistent definition
    outcome = ACTIONS["resume_vm"].perform(shard.ctx, plan)
    shard.store.rollback()
    assert outcome.state == "failed", outcome
    shard.record(task, outcome.state, outcome.message, outcome.row_updates)
    _host_status_pass(shard)
    assert _row(dsn, vm_id) == {"state": "stopped", "host_id": None}
    assert checker.vm_rows(dsn) == []
