"""Host actions. ``clear_vms`` empties a disabled host; ``evacuate_vm`` moves one VM off it.

clear_vms queues one ``evacuate_vm`` per VM whose row names the host, as
ordinary VM tasks: each waits behind that VM's own pending tasks, so per-VM
order holds, and each decides from the VM's real state *when it runs* (an
earlier task of the VM may have changed it):

- running: live migration to a placed host (migrate_vm's own work);
- suspended (paused): migrated the same way, and stays paused there;
- stopped: nothing runs there; a leftover definition is undefined and the
  row no longer names the host;
- saved: with ``save_dir_shared`` the image is readable on every node, so the
  domain definition moves to a placed host (restore_vm then runs there);
  without it the VM stays, and its task says so by name without failing.

The host task waits (its key parked, the shard free for other work) until every
one of them has ended; it finishes when each VM it could move has moved, and
fails naming each VM that could not move, with the reason (their tasks' messages).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import libvirt

from taskomatic.actions.base import (
    Action,
    ActionContext,
    Outcome,
    Plan,
    Reconciled,
    RowUpdate,
    Settlement,
    TaskFailed,
    TaskRetry,
)
from taskomatic.actions.libvirt_util import is_transient
from taskomatic.actions.migrate import MIGRATABLE_STATES, MigrateVm
from taskomatic.actions.vm_state import (
    NOT_RUNNING,
    Observed,
    connect_host,
    image_exists,
    observe,
    save_path,
    undefine_quietly,
    vm_row,
)
from taskomatic.actions.vm_storage import activate_pools, storage_needs
from taskomatic.db import hosts as hosts_db
from taskomatic.db import task_writes
from taskomatic.db import vms as vms_db
from taskomatic.db.storage_placement import vm_disk_pools
from taskomatic.model import TaskRow
from taskomatic.text import quoted

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
        plan.begin_hook = lambda store: self._queue_evacuations(store, plan)
        return plan

    def _queue_evacuations(self, store: Any, plan: Plan) -> None:
        """Inside the transaction that marks the task running: queue one evacuate_vm per VM, atomically."""
        host = plan.data["host"]
        vms = vms_db.vms_on_host(store, host["id"])
        children = [task_writes.insert_child_task(store, plan.task.id, target_type="Vm", target_id=vm["id"],
                                                  action="evacuate_vm", args=json.dumps({"from_host_id": host["id"]}),
                                                  submitted_by=f"clear_vms (task {plan.task.id})") for vm in vms]
        plan.data["children"] = children

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        children = plan.data["children"]
        host = plan.data["host"]
        if not children:
            return Outcome.finished(f"host {host['id']} ({host['hostname']}) has no VMs")
        return Outcome.waiting(f"moving {len(children)} VMs off host {host['id']} (tasks {children})")

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        # 'running' means the evacuations were queued (in the same transaction): wait for them.
        return Reconciled(Settlement.WAITING, "interrupted while waiting for its evacuations; waiting again")


# migrate_vm does the moving of running and paused VMs, and places saved ones.
_MIGRATE = MigrateVm("migrate_vm")


def _vm_label(vm: dict[str, Any]) -> str:
    return f"VM {vm['id']} ({quoted(vm['description'])})"


class EvacuateVm:
    """Move one VM off ``args.from_host_id`` whatever its state (see the module's docstring).

    Queued by clear_vms; an operator may submit it too. A VM whose row no longer
    names that host is a no-op success.
    """

    name = "evacuate_vm"
    target_types: tuple[str, ...] = ("Vm",)

    def validate_args(self, args: dict[str, Any]) -> None:
        unknown = sorted(set(args) - {"from_host_id"})
        if unknown:
            raise TaskFailed(f"evacuate_vm: unknown argument(s) {', '.join(unknown)} (allowed: from_host_id)")
        leaving = args.get("from_host_id")
        if isinstance(leaving, bool) or not isinstance(leaving, int):
            raise TaskFailed(f"evacuate_vm: args.from_host_id must be the integer id of the host to leave, "
                             f"got {leaving!r}")

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        vm = vm_row(ctx, task)
        leaving = task.args["from_host_id"]
        if vm["host_id"] != leaving:
            where = f"host {vm['host_id']}" if vm["host_id"] is not None else "no host"
            return Plan(task, already_done=Outcome.finished(
                f"{_vm_label(vm)} is no longer on host {leaving} (now on {where}); nothing to move"))
        observed = observe(ctx, vm)
        if observed.state in MIGRATABLE_STATES:
            try:
                plan = _MIGRATE.prepare(ctx, replace(task, args={}))  # placement picks the destination
            except TaskFailed as failure:
                raise TaskFailed(f"{_vm_label(vm)} ({observed.state}) cannot leave host {leaving}: "
                                 f"{failure.message}", failure.row_updates) from None
            plan.data["mode"] = "migrate"
            return plan
        if observed.state == "stopped":
            return Plan(task, data={"mode": "forget", "vm": vm, "observed": observed})
        if observed.state == "saved":
            return self._prepare_saved(ctx, task, vm, observed)
        raise TaskFailed(f"{_vm_label(vm)} cannot leave host {leaving}: it is {observed.state} "
                         f"({observed.detail})")

    def _prepare_saved(self, ctx: ActionContext, task: TaskRow, vm: dict[str, Any], observed: Observed) -> Plan:
        leaving = task.args["from_host_id"]
        if not ctx.config.save_dir_shared:
            return Plan(task, already_done=Outcome.finished(
                f"{_vm_label(vm)} stays on host {leaving}: it is saved, and its image in {ctx.config.save_dir} "
                "is on that host only (save_dir_shared is off); restore it, then clear the host again"))
        pools = vm_disk_pools(ctx.store, vm["id"])
        local = storage_needs(vm["id"], pools).local_pools
        if local:
            raise TaskFailed(f"{_vm_label(vm)} (saved) cannot leave host {leaving}: its disks are on local "
                             f"storage ({', '.join(quoted(p['name']) for p in local)})")
        plan = Plan(replace(task, args={}), data={"mode": "move_saved", "vm": vm, "observed": observed})
        plan.begin_hook = lambda store: self._place_saved(store, plan)
        return plan

    def _place_saved(self, store: Any, plan: Plan) -> None:
        """In the mark-running transaction: a host with room (saved VMs count where they live)."""
        vm = plan.data["vm"]
        destination = _MIGRATE.choose_host(store, plan, exclude=vm["host_id"])
        store.update_row("vms", vm["id"], {"target_host_id": destination["id"]})
        plan.data["destination"] = destination

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        mode = plan.data["mode"]
        if mode == "migrate":
            return _MIGRATE.perform(ctx, plan)
        if mode == "forget":
            ctx.ensure_lease()
            return self._forget(ctx, plan)
        return self._move_saved(ctx, plan)

    def _forget(self, ctx: ActionContext, plan: Plan) -> Outcome:
        vm, observed = plan.data["vm"], plan.data["observed"]
        if observed.domain is not None:
            undefine_quietly(ctx, observed.domain)  # a stopped definition left there
        return Outcome.finished(f"{_vm_label(vm)} is stopped; its row no longer names host {vm['host_id']}",
                                RowUpdate("vms", vm["id"], {"state": "stopped", **NOT_RUNNING}))

    def _move_saved(self, ctx: ActionContext, plan: Plan) -> Outcome:
        """The image stays where it is (shared save_dir); the definition moves to the destination."""
        vm, observed, destination = plan.data["vm"], plan.data["observed"], plan.data["destination"]
        source = observed.host
        path = save_path(ctx, vm)
        stay = RowUpdate("vms", vm["id"], {"target_host_id": None})
        try:
            activate_pools(ctx, destination, plan.data.get("pools", ()), self.name)
            target = connect_host(ctx, destination)
            if not image_exists(target, path):
                return Outcome.failed(
                    f"{_vm_label(vm)} (saved) cannot leave host {vm['host_id']}: its image {path} is not "
                    f"readable on host {destination['id']} ({destination['hostname']}), although "
                    "save_dir_shared says save_dir is shared", stay)
            if observed.domain is not None:
                xml = observed.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            else:
                xml = target.saveImageGetXMLDesc(path, 0)
            ctx.ensure_lease()
            target.defineXML(xml)
            if observed.domain is not None:
                ctx.ensure_lease()
                observed.domain.undefine()
        except TaskFailed as failure:
            return Outcome.failed(failure.message, stay)
        except libvirt.libvirtError as exc:
            if is_transient(exc):
                raise TaskRetry(f"evacuate_vm: {exc.get_error_message()}") from None
            where = f"host {source['id']}" if source else "its host"
            return Outcome.failed(f"{_vm_label(vm)} (saved) could not move from {where} to host "
                                  f"{destination['id']}: {exc.get_error_message()}", stay)
        return Outcome.finished(
            f"{_vm_label(vm)} (saved) moved to host {destination['id']} ({destination['hostname']})",
            RowUpdate("vms", vm["id"], {"host_id": destination["id"], "target_host_id": None}))

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        try:
            vm = vm_row(ctx, task)
        except TaskFailed as failure:
            return Reconciled(Settlement.NEITHER, f"interrupted; {failure.message}")
        if vm["target_host_id"] is None:
            # Nothing was under way (forgetting a stopped VM is repeatable): run it again.
            return Reconciled(Settlement.NOT_STARTED, "interrupted; evacuating again")
        if vm["state"] != "saved":
            return _MIGRATE.reconcile(ctx, task)
        try:
            on_target = observe(ctx, {**vm, "host_id": vm["target_host_id"]})
        except TaskFailed as failure:
            return Reconciled(Settlement.NEITHER, f"interrupted, and the real state is unknown: {failure.message}",
                              [RowUpdate("vms", vm["id"], {"target_host_id": None})])
        if on_target.domain is not None:
            return Reconciled(Settlement.DONE, f"interrupted, but the saved VM moved ({on_target.detail})",
                              [RowUpdate("vms", vm["id"], {"host_id": vm["target_host_id"],
                                                           "target_host_id": None})])
        return Reconciled(Settlement.NOT_STARTED, "interrupted before the saved VM moved",
                          [RowUpdate("vms", vm["id"], {"target_host_id": None})])


ACTIONS: list[Action] = [ClearVms(), EvacuateVm()]
