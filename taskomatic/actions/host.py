"""Host actions. ``clear_vms`` empties a disabled host by live migration.

It queues one ``migrate_vm`` per VM on the host, as ordinary VM tasks: each
waits behind that VM's own pending tasks, so per-VM order holds. The host
task then waits (its key parked, the shard free for other work) until every
one of them has ended, and fails if any did not finish, saying which and why.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from taskomatic.actions.base import (
    Action,
    ActionContext,
    Outcome,
    Plan,
    Reconciled,
    Settlement,
    TaskFailed,
)
from taskomatic.db import hosts as hosts_db
from taskomatic.db import task_writes
from taskomatic.db import vms as vms_db
from taskomatic.db.store import Store
from taskomatic.model import TaskRow

log = logging.getLogger(__name__)


class ClearVms:
    name = "clear_vms"
    target_types: tuple[str, ...] = ("Host",)

    def validate_args(self, args: dict[str, Any]) -> None:
        if args:
            raise TaskFailed(f"clear_vms: unknown argument(s) {', '.join(sorted(args))} (allowed: none)")

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        if task.target_id is None:
            raise TaskFailed("task_target_id is NULL; a Host task needs the host's id")
        host = hosts_db.get_host(ctx.store, task.target_id)
        if host is None:
            raise TaskFailed(f"host {task.target_id} does not exist")
        if not host["is_disabled"]:
            raise TaskFailed(f"clear_vms: host {host['id']} ({host['hostname']}) is not disabled; disable it "
                             "first (hosts.is_disabled) so that nothing new is placed there")
        plan = Plan(task, data={"host": host})
        plan.begin_hook = lambda store: self._queue_migrations(store, plan)
        return plan

    def _queue_migrations(self, store: Store, plan: Plan) -> None:
        """Inside the transaction that marks the task running: queue the migrations atomically."""
        host = plan.data["host"]
        vms = vms_db.vms_on_host(store, host["id"])
        children = [task_writes.insert_child_task(store, plan.task.id, target_type="Vm", target_id=vm["id"],
                                                  action="migrate_vm", args=json.dumps({}),
                                                  submitted_by=f"clear_vms (task {plan.task.id})") for vm in vms]
        plan.data["children"] = children

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        children = plan.data["children"]
        host = plan.data["host"]
        if not children:
            return Outcome.finished(f"host {host['id']} ({host['hostname']}) has no VMs")
        return Outcome.waiting(f"migrating {len(children)} VMs off host {host['id']} (tasks {children})")

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        # 'running' means the migrations were queued (in the same transaction): wait for them.
        return Reconciled(Settlement.WAITING, "interrupted while waiting for its migrations; waiting again")


ACTIONS: list[Action] = [ClearVms()]
