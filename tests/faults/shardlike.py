"""One shard's steps, driven one at a time in the test process, so a fault fits between any two.

Shared by the tests that inject an interleaving instead of hoping for it
(test_reconciled_rows.py, test_node_fencing.py). Each action is driven the way
a shard drives it (runtime/execution.py): prepare, mark running + ``plan.begin``
in one transaction, perform, record the outcome with its row updates under
the claim. Real PostgreSQL, real libvirtd nodes (the test driver behind them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from psycopg2.extras import Json

from taskomatic.actions.base import Action, ActionContext, Plan, Reconciled
from taskomatic.actions.connections import LibvirtConnections
from taskomatic.actions.registry import load_actions
from taskomatic.config import Config
from taskomatic.db.store import Store
from taskomatic.model import TaskRow
from taskomatic.runtime.reconciler import reconcile_once
from tests.helpers import query

ACTIONS: dict[str, Action] = load_actions()


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Shardlike:
    dsn: str
    store: Store
    ctx: ActionContext
    instance_id: int
    lease_good: bool = True  # what the shard's local copy of the lease says (multihost)

    @classmethod
    def open(cls, dsn: str, config: Config | None = None, name: str = "shardlike") -> Shardlike:
        store = Store.open(dsn, f"test {name}", timeout=10, begin_with_first=True)  # as a shard's
        with store.transaction():
            instance_id = store.scalar("register_instance", hostname="testhost", pid=os.getpid(), version="test",
                                       mode="standalone", shards=1, lease=None)
        connections = LibvirtConnections(keepalive_interval=1, keepalive_count=2)
        shard = cls(dsn, store, ActionContext(store, config or Config(dsn=dsn), connections), int(instance_id))
        shard.ctx.lease_ok = lambda: shard.lease_good
        return shard

    def close(self) -> None:
        try:
            self.ctx.libvirt.close_all()
        finally:
            self.store.close()

    def submit(self, vm_id: int, action: str, args: dict[str, Any] | None = None) -> TaskRow:
        row = query(self.dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by) "
                              "VALUES ('Vm', %s, %s, %s, 'test') RETURNING id, key_type, key_id",
                    (vm_id, action, Json(args or {})))[0]
        self.adopt(row["id"])
        return TaskRow(row["id"], "Vm", vm_id, action, args or {}, row["key_type"], row["key_id"], "queued")

    def adopt(self, task_id: int) -> None:
        """The task is this shard's claim now (a claim, or a takeover of an expired holder's)."""
        query(self.dsn, "UPDATE tasks SET claimed_by = %s, claimed_at = clock_timestamp() WHERE id = %s",
              (self.instance_id, task_id))

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

    def reconcile(self, task: TaskRow) -> Reconciled:
        settled = ACTIONS[task.action].reconcile(self.ctx, replace(task, state="running"))
        self.store.rollback()
        return settled

    def host_status_pass(self) -> None:
        reconcile_once(self.store, self.ctx.libvirt)
        self.store.rollback()


def add_hosts(dsn: str, nodes: list[Any]) -> list[int]:
    return [query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                       "VALUES (%s, %s, 'TEST', 64, 268435456) RETURNING id", (f"n{i}", node.test_uri))[0]["id"]
            for i, node in enumerate(nodes)]


def vm_on(shard: Shardlike, host_id: int, name: str) -> int:
    """A VM started on ``host_id`` (start_vm with args.host_id, as a shard runs it)."""
    vm_id = query(shard.dsn, "INSERT INTO vms (description, state, num_vcpus_allocated, memory_allocated) "
                             "VALUES (%s, 'stopped', 1, 65536) RETURNING id", (name,))[0]["id"]
    shard.run(vm_id, "start_vm", {"host_id": host_id})
    return int(vm_id)


def vm_row(dsn: str, vm_id: int) -> dict[str, Any]:
    return query(dsn, "SELECT state, host_id FROM vms WHERE id = %s", (vm_id,))[0]
