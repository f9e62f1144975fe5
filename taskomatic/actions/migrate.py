"""migrate_vm: live migration to a placed host (or ``args.host_id``).

A running guest migrates live; a paused one migrates and stays paused. The
VM's pools are made active on the destination first; a VM with a disk on a
local pool is refused (see actions/vm_storage.py: taskomatic does not copy
disks during a migration). libvirt's test driver cannot migrate: there the
domain is defined and started on the destination and removed from the source.
"""

from __future__ import annotations

import logging
import threading
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
from taskomatic.actions.states import Verdict
from taskomatic.actions.vm import PlacedAction
from taskomatic.actions.vm_state import (
    Observed,
    connect_host,
    found_as,
    host_label,
    libvirt_failure,
    observe,
    running_updates,
    vm_row,
)
from taskomatic.actions.vm_storage import StorageNeeds, activate_pools, pool_label, storage_needs
from taskomatic.db.storage_placement import vm_disk_pools
from taskomatic.model import TaskRow

log = logging.getLogger(__name__)

# migrate_vm moves a running guest, and a paused one (it stays paused).
MIGRATABLE_STATES = ("running", "suspended")


class MigrateVm(PlacedAction):
    """running (or suspended) -> the same state on another host: live migration (libvirt),
    bounded by migration_timeout. A paused guest migrates and stays paused. A VM with a
    disk on a local pool is refused (see actions/vm_storage.py): its disk cannot follow."""

    def verdict(self, real_state: str) -> str:
        return Verdict.RUN if real_state in MIGRATABLE_STATES else Verdict.IMPOSSIBLE

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        plan = super().prepare(ctx, task)
        if plan.already_done is None:
            vm = plan.data["vm"]
            wanted = task.args.get("host_id")
            if wanted is not None and wanted == vm["host_id"]:
                raise TaskFailed(f"migrate_vm: VM {task.target_id} already runs on host {wanted}; "
                                 "a VM is never migrated to its own host")
            refuse_local_disks(vm["id"], storage_needs(vm["id"], vm_disk_pools(ctx.store, vm["id"])))
            plan.begin_updates = []
            plan.begin_hook = lambda store: self._place(store, plan)
        return plan

    def _place(self, store: Any, plan: Plan) -> None:
        vm = plan.data["vm"]
        destination = self.choose_host(store, plan, exclude=vm["host_id"])  # never its own host
        store.update_row("vms", vm["id"], {"state": "migrating", "target_host_id": destination["id"]})
        plan.data["destination"] = destination

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        vm, source, destination = plan.data["vm"], plan.data["observed"].host, plan.data["destination"]
        domain = plan.data["observed"].domain
        paused = plan.data["observed"].state == "suspended"
        pools = plan.data.get("pools", ())
        try:
            activate_pools(ctx, destination, pools, self.name)  # its disks reachable there first
            target = connect_host(ctx, destination)
            if destination["hypervisor_type"] == "TEST" or source["hypervisor_type"] == "TEST":
                moved = _move_test_domain(ctx, domain, target, paused)
            else:
                moved = _live_migrate(ctx, domain, target, paused=paused, shared_disks=bool(pools))
        except (libvirt.libvirtError, TaskFailed) as exc:
            if isinstance(exc, libvirt.libvirtError) and is_transient(exc):
                raise TaskRetry(libvirt_failure("migrate_vm", source, exc)) from None
            message = exc.message if isinstance(exc, TaskFailed) else libvirt_failure(
                "migrate_vm", source, exc) + f" (to {host_label(destination)})"
            after = self._state_after_failure(ctx, vm)
            return Outcome.failed(message, RowUpdate("vms", vm["id"], {**after, "target_host_id": None}))
        state = "suspended" if paused else "running"
        observed = Observed(state, f"domain {state} on {host_label(destination)}", moved, destination)
        return Outcome.finished(None, RowUpdate("vms", vm["id"], {**running_updates(vm, observed),
                                                                  "state": state, "target_host_id": None}))

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        try:
            vm = vm_row(ctx, task)
            on_source = observe(ctx, vm)
            on_target = None
            if vm.get("target_host_id") is not None:
                on_target = observe(ctx, {**vm, "host_id": vm["target_host_id"]})
        except TaskFailed as failure:
            return Reconciled(Settlement.NEITHER, f"interrupted, and the real state is unknown: {failure.message}")
        if on_target is not None and on_target.state in MIGRATABLE_STATES:
            return Reconciled(Settlement.DONE, f"interrupted, but it took effect ({on_target.detail})",
                              [RowUpdate("vms", vm["id"], {**running_updates(vm, on_target),
                                                           "state": on_target.state, "target_host_id": None})])
        if on_source.state in MIGRATABLE_STATES:
            return Reconciled(Settlement.NOT_STARTED, f"interrupted before it took effect ({on_source.detail})",
                              [RowUpdate("vms", vm["id"], {"target_host_id": None})])
        return Reconciled(Settlement.NEITHER,
                          f"interrupted; VM {vm['id']} is {on_source.state} ({on_source.detail})",
                          [RowUpdate("vms", vm["id"], {**found_as(ctx, on_source), "target_host_id": None})])


def refuse_local_disks(vm_id: int, storage: StorageNeeds) -> None:
    """A disk on a local pool cannot follow its VM to another host: say so (no storage copy)."""
    local = storage.local_pools
    if local:
        pools = ", ".join(f"{pool_label(p)}" + (f" of host {p['host_id']}" if p["host_id"] is not None else "")
                          for p in local)
        raise TaskFailed(f"migrate_vm: VM {vm_id} has disks on local storage ({pools}); they cannot follow it to "
                         "another host and taskomatic does not copy disks during a migration. Put its volumes "
                         "on a shared pool (netfs, iscsi, or a dir pool marked storage_pools.shared)")


def _live_migrate(ctx: ActionContext, domain: libvirt.virDomain, target: libvirt.virConnect,
                  paused: bool = False, shared_disks: bool = False) -> libvirt.virDomain:
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    if paused:
        flags |= libvirt.VIR_MIGRATE_PAUSED  # a paused guest stays paused on the destination
    if shared_disks:
        # Every disk is on a pool the administrator declared shared (migrate_vm refuses local ones).
        # libvirt only recognises some shared file systems (NFS, GFS2...) and otherwise refuses a
        # disk cached by the host as unsafe; the declaration is what it cannot know.
        flags |= libvirt.VIR_MIGRATE_UNSAFE
    # A migration that does not converge in time is aborted; the guest keeps running on the source.
    timer = threading.Timer(ctx.config.migration_timeout, _abort_job, args=(domain,))
    timer.daemon = True
    timer.start()
    try:
        ctx.ensure_lease()
        return domain.migrate(target, flags, None, ctx.config.migration_uri or None, 0)
    except libvirt.libvirtError as exc:
        if not timer.is_alive():
            raise TaskFailed(f"migrate_vm: did not complete within {ctx.config.migration_timeout:g} s and "
                             f"was aborted ({exc.get_error_message()})") from None
        raise
    finally:
        timer.cancel()


def _abort_job(domain: libvirt.virDomain) -> None:
    try:
        domain.abortJob()
    except libvirt.libvirtError as exc:
        log.warning("could not abort a migration that timed out: %s", exc.get_error_message())


def _move_test_domain(ctx: ActionContext, domain: libvirt.virDomain, target: libvirt.virConnect,
                      paused: bool = False) -> libvirt.virDomain:
    """libvirt's test driver cannot migrate: define and start on the target, then remove the source."""
    xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    ctx.ensure_lease()
    moved = target.defineXML(xml)
    ctx.ensure_lease()
    moved.create()
    if paused:
        ctx.ensure_lease()
        moved.suspend()
    ctx.ensure_lease()
    domain.destroy()
    ctx.ensure_lease()
    domain.undefine()
    return moved


ACTIONS: list[Action] = [MigrateVm("migrate_vm")]
