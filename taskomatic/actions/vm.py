"""VM actions on libvirt, after the oVirt state table (actions/states.py).

Every action checks its precondition against the domain's real state, not
the row: the row may be stale after a crash or a change made behind our back.
That state is read by vm_state.py; this module decides and acts on it.
"""

from __future__ import annotations

import logging
import time
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
from taskomatic.actions.domain_xml import domain_xml
from taskomatic.actions.libvirt_util import is_transient
from taskomatic.actions.states import VM_TRANSITIONS, Verdict, precondition
from taskomatic.actions.vm_state import (
    NOT_RUNNING,
    ROW_ONLY_STATES,
    Observed,
    connect_host,
    delete_save_image,
    domain_spec,
    found_as,
    host_label,
    libvirt_failure,
    observe,
    running_updates,
    save_path,
    undefine_quietly,
    vm_row,
)
from taskomatic.actions.vm_storage import StorageNeeds, activate_pools, storage_needs
from taskomatic.db import hosts as hosts_db
from taskomatic.db import vms as vms_db
from taskomatic.db.storage_placement import place_local_pool, vm_disk_pools
from taskomatic.model import TaskRow
from taskomatic.text import quoted

log = logging.getLogger(__name__)

_SHUTDOWN_POLL_SECONDS = 0.2
# The ids the database can hold (bigint).
MAX_ID = 2**63 - 1


class VmAction:
    """Shared logic: preconditions, transient state, generic reconciliation."""

    target_types: tuple[str, ...] = ("Vm",)
    allowed_args: frozenset[str] = frozenset()

    def __init__(self, name: str) -> None:
        self.name = name
        self.transition = VM_TRANSITIONS[name]

    def validate_args(self, args: dict[str, Any]) -> None:
        unknown = sorted(set(args) - self.allowed_args)
        if unknown:
            allowed = ", ".join(sorted(self.allowed_args)) or "none"
            raise TaskFailed(f"{self.name}: unknown argument(s) {', '.join(unknown)} (allowed: {allowed})")

    # -- prepare -----------------------------------------------------------
    def real_state(self, ctx: ActionContext, vm: dict[str, Any]) -> Observed:
        return observe(ctx, vm)

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        vm = vm_row(ctx, task)
        observed = self.real_state(ctx, vm)
        verdict = self.verdict(observed.state)
        if verdict == Verdict.ALREADY_DONE:
            return Plan(task, already_done=Outcome.finished(
                f"VM {vm['id']} is already {observed.state}; nothing to do",
                *self.success_updates(ctx, vm, observed)))
        if verdict == Verdict.IMPOSSIBLE:
            corrections = []
            if observed.state == "stopped" and vm["host_id"] is not None:
                # Found stopped (a lost save image, a guest that powered itself off): it
                # holds no host any more, and a leftover definition is removed.
                if observed.domain is not None:
                    undefine_quietly(ctx, observed.domain)
                corrections.append(RowUpdate("vms", vm["id"], {"state": "stopped", **NOT_RUNNING}))
            elif observed.state != vm["state"]:
                corrections.append(RowUpdate("vms", vm["id"], {"state": observed.state}))
            raise TaskFailed(
                f"cannot {self.name.replace('_vm', '')} VM {vm['id']} ({quoted(vm['description'])}): it is "
                f"{observed.state}, {self.name} needs {self.transition.start} ({observed.detail})",
                corrections,
            )
        return Plan(
            task,
            begin_updates=[RowUpdate("vms", vm["id"], {"state": self.transition.transient})],
            data={"vm": vm, "observed": observed},
        )

    def verdict(self, real_state: str) -> str:
        return precondition(self.name, real_state)

    # -- perform -----------------------------------------------------------
    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        vm = plan.data["vm"]
        observed: Observed = plan.data["observed"]
        try:
            ctx.ensure_lease()  # a shard frozen since it was marked running must not change the node now
            self.act(ctx, vm, observed)
        except libvirt.libvirtError as exc:
            if observed.host is not None and is_transient(exc):
                ctx.libvirt.drop(observed.host["libvirt_uri"])
                raise TaskRetry(libvirt_failure(self.name, observed.host, exc)) from None
            after = self._state_after_failure(ctx, vm)
            return Outcome.failed(libvirt_failure(self.name, observed.host, exc),
                                  RowUpdate("vms", vm["id"], after))
        except TaskFailed as failure:
            after = self._state_after_failure(ctx, vm)
            return Outcome.failed(failure.message, RowUpdate("vms", vm["id"], after), *failure.row_updates)
        fresh = observe(ctx, vm)
        return Outcome.finished(None, *self.success_updates(ctx, vm, fresh))

    def act(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> None:
        raise NotImplementedError

    def success_updates(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> list[RowUpdate]:
        return [RowUpdate("vms", vm["id"], {"state": self.transition.success})]

    def _state_after_failure(self, ctx: ActionContext, vm: dict[str, Any]) -> dict[str, Any]:
        """The real state if it can be read, else the table's failure state."""
        try:
            real = observe(ctx, vm)
        except (TaskFailed, TaskRetry):
            return {"state": self.transition.failure}
        if real.state == "stopped":
            return found_as(ctx, real)  # a guest gone under the action (killed, crashed) holds no host
        values: dict[str, Any] = {"state": real.state}
        if real.domain is None and real.state in ROW_ONLY_STATES:
            values.update(NOT_RUNNING)
        return values

    # -- reconcile ---------------------------------------------------------
    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        try:
            vm = vm_row(ctx, task)
            observed = observe(ctx, vm)
        except TaskFailed as failure:
            return Reconciled(Settlement.NEITHER, f"interrupted, and the real state is unknown: {failure.message}")
        if observed.state == self.transition.success:
            return Reconciled(Settlement.DONE, f"interrupted, but it took effect ({observed.detail})",
                              self.success_updates(ctx, vm, observed))
        if observed.state == self.transition.start:
            return Reconciled(Settlement.NOT_STARTED, f"interrupted before it took effect ({observed.detail})")
        return Reconciled(
            Settlement.NEITHER,
            f"interrupted; found VM {vm['id']} {observed.state}, neither {self.transition.start} "
            f"nor {self.transition.success} ({observed.detail})",
            [RowUpdate("vms", vm["id"], found_as(ctx, observed))],
        )


class CreateVm(VmAction):
    """pending -> stopped: check the VM can be defined. No domain exists until start_vm."""

    def real_state(self, ctx: ActionContext, vm: dict[str, Any]) -> Observed:
        # create_vm works on the row only; a failed or interrupted create may be tried again.
        state = "pending" if vm["state"] in ("create_failed", "creating") else vm["state"]
        return Observed(state, f"VM row is {vm['state']}", None, None)

    def act(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> None:
        # Building the XML proves every field fits a domain definition.
        # (Disks may still be on their way: a create_volume of the VM's pool can run later.)
        domain_xml(domain_spec(ctx, vm, {"hypervisor_type": "QEMU", "arch": "x86_64"}, with_disks=False))

    def _state_after_failure(self, ctx: ActionContext, vm: dict[str, Any]) -> dict[str, Any]:
        return {"state": "create_failed"}

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        # Nothing outside the database changed: always safe to run again.
        return Reconciled(Settlement.NOT_STARTED, "interrupted; create_vm has no effect outside the database")


PLACEMENT_LOCK_ID = 0x7A5C0003


def _placement_candidates(store: Any, vm: dict[str, Any]) -> list[dict[str, Any]]:
    """Hosts that can take ``vm``, best first; serialised with every other placement."""
    return vms_db.placement_candidates(store, vm["id"], vm["memory_allocated"], vm["num_vcpus_allocated"],
                                       PLACEMENT_LOCK_ID)


class PlacedAction(VmAction):
    """An action that puts the VM on a host: placement, or ``args.host_id`` when given."""

    allowed_args = frozenset({"host_id"})

    def validate_args(self, args: dict[str, Any]) -> None:
        super().validate_args(args)
        host_id = args.get("host_id")
        if host_id is not None and (isinstance(host_id, bool) or not isinstance(host_id, int)):
            shown = quoted(host_id) if isinstance(host_id, str) else repr(host_id)
            raise TaskFailed(f"{self.name}: args.host_id must be an integer host id, got {shown}")
        if host_id is not None and not 1 <= host_id <= MAX_ID:
            raise TaskFailed(f"{self.name}: args.host_id must be an integer host id (1 to {MAX_ID}), "
                             f"got {host_id}; no host has that id")

    def choose_host(self, store: Any, plan: Plan, exclude: int | None = None) -> dict[str, Any]:
        """Inside the mark-running transaction: the host for the VM, or TaskFailed/TaskRetry saying why."""
        vm = plan.data["vm"]
        wanted = plan.task.args.get("host_id")
        try:
            storage = storage_needs(vm["id"], vm_disk_pools(store, vm["id"]))
        except TaskFailed as failure:
            raise TaskFailed(f"{self.name}: {failure.message}") from None
        plan.data["pools"] = list(storage.pools)
        candidates = [h for h in _placement_candidates(store, vm) if h["id"] != exclude]
        needs = f"{vm['memory_allocated']} KB free memory and {vm['num_vcpus_allocated']} free vcpus"
        if storage.local_host_id is not None:
            # Only the host of its local disks reaches them all.
            if wanted is not None and wanted != storage.local_host_id:
                raise TaskFailed(f"{self.name}: host {wanted} cannot reach the disks of VM {vm['id']}: they are "
                                 f"on {storage.describe_local()}")
            candidates = [h for h in candidates if storage.allows(h["id"])]
            if wanted is None and not candidates:
                raise TaskFailed(f"{self.name}: VM {vm['id']} has disks on {storage.describe_local()}, the only "
                                 f"host that reaches them, and that host is not available, enabled and with "
                                 f"{needs}" + (" (or it is the VM's own host)" if exclude is not None else ""))
        if wanted is None:
            if not candidates:
                other = "other " if exclude is not None else ""
                raise TaskFailed(f"{self.name}: no {other}available, enabled host has {needs} for VM {vm['id']}")
            return self._with_local_pools(store, storage, candidates[0])
        chosen = [h for h in candidates if h["id"] == wanted]
        if chosen:
            return self._with_local_pools(store, storage, chosen[0])
        host = hosts_db.get_host(store, wanted)
        if host is None:
            raise TaskFailed(f"{self.name}: host {wanted} does not exist")
        if host["state"] == "unavailable" and not host["is_disabled"]:
            # The host asked for may come back (a node restarting): worth waiting for.
            raise TaskRetry(f"{self.name}: host {wanted} ({host['hostname']}) is unavailable")
        raise TaskFailed(f"{self.name}: host {wanted} ({host['hostname']}) cannot take VM {vm['id']}: it is "
                         f"{'disabled' if host['is_disabled'] else host['state']} or lacks {needs}")

    @staticmethod
    def _with_local_pools(store: Any, storage: StorageNeeds, host: dict[str, Any]) -> dict[str, Any]:
        """Local pools with no host yet become local to the VM's host (same transaction as the placement)."""
        for pool in storage.unplaced_local_pools:
            place_local_pool(store, pool["id"], host["id"])
        return host


class StartVm(PlacedAction):
    """stopped -> running: place, define from the row, start, read the VNC port."""

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        plan = super().prepare(ctx, task)
        if plan.already_done is None:
            domain_spec(ctx, plan.data["vm"], {"hypervisor_type": "TEST"})  # its disks must be ready: fail now if not
            plan.begin_updates = []  # placement writes state and host together
            plan.begin_hook = lambda store: self._place(store, plan)
        return plan

    def _place(self, store: Any, plan: Plan) -> None:
        host = self.choose_host(store, plan)
        store.update_row("vms", plan.data["vm"]["id"], {"state": "starting", "host_id": host["id"]})
        plan.data["host"] = host

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        vm, host = plan.data["vm"], plan.data["host"]
        leftover: Observed = plan.data["observed"]
        if leftover.domain is not None and leftover.host is not None and leftover.host["id"] != host["id"]:
            # An inactive definition on the VM's previous host would be a second copy to start.
            undefine_quietly(ctx, leftover.domain)
        try:
            activate_pools(ctx, host, plan.data.get("pools", ()), self.name)  # its disks reachable there first
        except TaskFailed as failure:
            return Outcome.failed(failure.message, RowUpdate("vms", vm["id"], {"state": "stopped", **NOT_RUNNING}))
        conn = connect_host(ctx, host)
        domain = None
        try:
            ctx.ensure_lease()
            domain = conn.defineXML(domain_xml(domain_spec(ctx, vm, host)))
            ctx.ensure_lease()
            domain.create()
        except libvirt.libvirtError as exc:
            if is_transient(exc):
                ctx.libvirt.drop(host["libvirt_uri"])
                raise TaskRetry(libvirt_failure("start_vm", host, exc)) from None
            if domain is not None:
                undefine_quietly(ctx, domain)
            return Outcome.failed(libvirt_failure("start_vm", host, exc),
                                  RowUpdate("vms", vm["id"], {"state": "stopped", **NOT_RUNNING}))
        observed = Observed("running", f"domain running on {host_label(host)}", domain, host)
        values = running_updates(vm, observed)
        values["boot_device"] = "hd"  # a one-off network/cdrom boot does not stick
        return Outcome.finished(None, RowUpdate("vms", vm["id"], values))

    def success_updates(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> list[RowUpdate]:
        return [RowUpdate("vms", vm["id"], running_updates(vm, observed))]


class StopVm(VmAction):
    """running -> stopped: shutdown (graceful, waits) or poweroff (destroy); then undefine."""

    def __init__(self, name: str, graceful: bool) -> None:
        super().__init__(name)
        self.graceful = graceful

    def act(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> None:
        domain = observed.domain
        assert domain is not None  # running implies a domain
        if self.graceful:
            domain.shutdown()
            if not _wait_inactive(domain, ctx.config.shutdown_timeout):
                if not ctx.config.shutdown_poweroff_fallback:
                    raise TaskFailed(
                        f"shutdown_vm: the guest of VM {vm['id']} did not stop within "
                        f"{ctx.config.shutdown_timeout:g} s; it is still running "
                        "(use poweroff_vm, or set shutdown_poweroff_fallback)")
                log.warning("VM %s ignored shutdown for %gs; powering off", vm["id"], ctx.config.shutdown_timeout)
                ctx.ensure_lease()  # the wait was long: is the VM still ours to power off?
                domain.destroy()
        else:
            domain.destroy()
        undefine_quietly(ctx, domain)

    def success_updates(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> list[RowUpdate]:
        if observed.domain is not None:
            undefine_quietly(ctx, observed.domain)
        return [RowUpdate("vms", vm["id"], {"state": "stopped", **NOT_RUNNING})]


def _wait_inactive(domain: libvirt.virDomain, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not domain.isActive():
                return True
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return True  # a transient domain disappears when it stops
            raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(_SHUTDOWN_POLL_SECONDS)


class SuspendVm(VmAction):
    def act(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> None:
        assert observed.domain is not None
        observed.domain.suspend()


class ResumeVm(VmAction):
    def act(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> None:
        assert observed.domain is not None
        observed.domain.resume()


class SaveVm(VmAction):
    """running -> saved: the memory image goes to save_dir on the node; the domain stays defined."""

    def act(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> None:
        assert observed.domain is not None
        observed.domain.save(save_path(ctx, vm))

    def success_updates(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> list[RowUpdate]:
        # host_id stays: the image lives on that node and restore_vm needs it.
        return [RowUpdate("vms", vm["id"], {"state": "saved", "vnc_port": None, "memory_used": 0,
                                            "num_vcpus_used": 0})]


class RestoreVm(VmAction):
    """saved -> running: restore from the image, then delete the image."""

    def act(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> None:
        assert observed.host is not None
        conn = connect_host(ctx, observed.host)
        path = save_path(ctx, vm)
        ctx.ensure_lease()
        conn.restore(path)
        delete_save_image(ctx, conn, path)

    def success_updates(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> list[RowUpdate]:
        if observed.host is not None and observed.state == "running":
            # Settled after a crash: the restore worked; the image may still be there.
            delete_save_image(ctx, connect_host(ctx, observed.host), save_path(ctx, vm))
        return [RowUpdate("vms", vm["id"], running_updates(vm, observed))]


ACTIONS: list[Action] = [
    CreateVm("create_vm"),
    StartVm("start_vm"),
    StopVm("shutdown_vm", graceful=True),
    StopVm("poweroff_vm", graceful=False),
    SuspendVm("suspend_vm"),
    ResumeVm("resume_vm"),
    SaveVm("save_vm"),
    RestoreVm("restore_vm"),
]
