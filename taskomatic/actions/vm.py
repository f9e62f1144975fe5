"""VM actions on libvirt, after the oVirt state table (actions/states.py).

Every action checks its precondition against the domain's real state, not
the row: the row may be stale after a crash or a change made behind our back.
A domain is found by the VM's UUID on the host in ``vms.host_id``; a VM with
no host, or whose domain is gone, is not running anywhere.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass
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
from taskomatic.actions.connections import HostUnreachable
from taskomatic.actions.domain_xml import Disk, DomainSpec, domain_xml, vnc_port
from taskomatic.actions.libvirt_util import domain_state, is_transient, libvirt_uri_problem, save_image_path
from taskomatic.actions.states import VM_TRANSITIONS, Verdict, precondition
from taskomatic.actions.vm_storage import StorageNeeds, activate_pools, storage_needs
from taskomatic.db import hosts as hosts_db
from taskomatic.db import vms as vms_db
from taskomatic.db.storage_placement import place_local_pool, vm_disk_pools
from taskomatic.model import TaskRow
from taskomatic.text import quoted

log = logging.getLogger(__name__)

# States that only the database knows: a VM in one of these has no domain.
_ROW_ONLY_STATES = ("pending", "create_failed", "invalid", "saved")
# A stopped domain with a save image is 'saved' while the row is in one of these.
_SAVE_STATES = ("saved", "saving", "restoring")
_SHUTDOWN_POLL_SECONDS = 0.2

# Cleared when a VM no longer runs anywhere.
_NOT_RUNNING = {"host_id": None, "vnc_port": None, "memory_used": 0, "num_vcpus_used": 0}


def domain_name(description: str) -> str:
    """The libvirt name for a VM: its description, minus what libvirt forbids.

    libvirt refuses '/' and control characters in names; everything else
    (XML metacharacters included) is kept and escaped by the XML library.
    """
    cleaned = "".join("_" if ch == "/" or not _xml_char(ch) else (" " if ord(ch) < 32 or ord(ch) == 127 else ch)
                      for ch in description)
    return cleaned.strip() or "vm"


# libvirt names files on the node after the domain (<name>.xml, <name>.log): a file name holds
# 255 bytes, minus the longest suffix.
MAX_DOMAIN_NAME_BYTES = 250
# The ids the database can hold (bigint).
MAX_ID = 2**63 - 1


def name_problem(vm: dict[str, Any]) -> str | None:
    """Why the VM's description cannot become a libvirt domain name (None if it can)."""
    size = len(domain_name(vm["description"]).encode("utf-8", "surrogatepass"))
    if size > MAX_DOMAIN_NAME_BYTES:
        return (f"VM {vm['id']}: its description {quoted(vm['description'])} is {size} bytes long; the libvirt "
                f"domain name made from it may be at most {MAX_DOMAIN_NAME_BYTES} bytes (the node names files "
                "after it): shorten vms.description")
    return None


def _xml_char(ch: str) -> bool:
    """Allowed in an XML 1.0 document (control characters are handled by the caller)."""
    code = ord(ch)
    return code < 0xD800 or 0xE000 <= code <= 0xFFFD or code >= 0x10000


@dataclass
class Observed:
    """The VM's real state as read from its node."""

    state: str
    detail: str
    domain: libvirt.virDomain | None
    host: dict[str, Any] | None


def _vm_row(ctx: ActionContext, task: TaskRow) -> dict[str, Any]:
    if task.target_id is None:
        raise TaskFailed("task_target_id is NULL; a Vm task needs the VM's id")
    vm = vms_db.get_vm(ctx.store, task.target_id)
    if vm is None:
        raise TaskFailed(f"VM {task.target_id} does not exist")
    return vm


def _host_label(host: dict[str, Any]) -> str:
    return f"host {host['id']} ({host['hostname']})"


def _connect(ctx: ActionContext, host: dict[str, Any]) -> libvirt.virConnect:
    problem = libvirt_uri_problem(host["libvirt_uri"])
    if problem:
        raise TaskFailed(f"{_host_label(host)}: {problem}")
    try:
        return ctx.libvirt.get(host["libvirt_uri"])
    except HostUnreachable as exc:
        raise TaskRetry(f"{_host_label(host)} is unreachable: {exc}") from None


def _read_failure(ctx: ActionContext, vm: dict[str, Any], host: dict[str, Any],
                  exc: libvirt.libvirtError) -> Exception:
    """A failed read of a domain: transient (retry) if the node or connection failed."""
    message = f"cannot read VM {vm['id']} on {_host_label(host)}: {exc.get_error_message()}"
    if is_transient(exc):
        ctx.libvirt.drop(host["libvirt_uri"])
        return TaskRetry(message)
    return TaskFailed(message)


def observe(ctx: ActionContext, vm: dict[str, Any]) -> Observed:
    if vm["host_id"] is None:
        state = vm["state"] if vm["state"] in _ROW_ONLY_STATES else "stopped"
        return Observed(state, f"VM {vm['id']} is not on any host", None, None)
    host = hosts_db.get_host(ctx.store, vm["host_id"])
    if host is None:  # the FK sets host_id NULL on delete; a race at most
        return Observed("stopped", f"host {vm['host_id']} no longer exists", None, None)
    conn = _connect(ctx, host)
    try:
        domain = conn.lookupByUUIDString(vm["uuid"])
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            state = vm["state"] if vm["state"] in _ROW_ONLY_STATES else "stopped"
            return Observed(state, f"no domain for VM {vm['id']} on {_host_label(host)}", None, host)
        raise _read_failure(ctx, vm, host, exc) from None
    try:
        code = domain.state()[0]
    except libvirt.libvirtError as exc:
        raise _read_failure(ctx, vm, host, exc) from None
    state = domain_state(code)
    if state == "stopped" and vm["state"] in _SAVE_STATES and _image_exists(conn, save_path(ctx, vm)):
        return Observed("saved", f"domain saved to {save_path(ctx, vm)} on {_host_label(host)}", domain, host)
    return Observed(state, f"domain is {state} on {_host_label(host)}", domain, host)


def save_path(ctx: ActionContext, vm: dict[str, Any]) -> str:
    """Where save_vm keeps a VM's memory image on its node: named after the VM, in save_dir."""
    return save_image_path(ctx.config.save_dir, vm["id"], vm["uuid"])


def found_as(observed: Observed) -> dict[str, Any]:
    """The row of a VM an interrupted task left as found: a stopped VM holds no host any more.

    (A node crash loses the domain: row and node then agree on 'stopped', so the
    host-status pass would never clear the host.) A leftover definition goes, as in prepare.
    """
    if observed.state != "stopped":
        return {"state": observed.state}
    if observed.domain is not None:
        _undefine_quietly(observed.domain)
    return {"state": "stopped", **_NOT_RUNNING}


def _image_exists(conn: libvirt.virConnect, path: str) -> bool:
    # The node's own view of the file: works for remote nodes too.
    try:
        conn.saveImageGetXMLDesc(path, 0)
        return True
    except libvirt.libvirtError:
        return False


def _libvirt_failure(action: str, host: dict[str, Any] | None, exc: libvirt.libvirtError) -> str:
    where = f" on {_host_label(host)}" if host else ""
    return f"{action} failed{where}: {exc.get_error_message()}"


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
        vm = _vm_row(ctx, task)
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
                    _undefine_quietly(observed.domain)
                corrections.append(RowUpdate("vms", vm["id"], {"state": "stopped", **_NOT_RUNNING}))
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
            self.act(ctx, vm, observed)
        except libvirt.libvirtError as exc:
            if observed.host is not None and is_transient(exc):
                ctx.libvirt.drop(observed.host["libvirt_uri"])
                raise TaskRetry(_libvirt_failure(self.name, observed.host, exc)) from None
            after = self._state_after_failure(ctx, vm)
            return Outcome.failed(_libvirt_failure(self.name, observed.host, exc),
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
            return found_as(real)  # a guest gone under the action (killed, crashed) holds no host
        values: dict[str, Any] = {"state": real.state}
        if real.domain is None and real.state in _ROW_ONLY_STATES:
            values.update(_NOT_RUNNING)
        return values

    # -- reconcile ---------------------------------------------------------
    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        try:
            vm = _vm_row(ctx, task)
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
            [RowUpdate("vms", vm["id"], found_as(observed))],
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
        domain_xml(_spec(ctx, vm, {"hypervisor_type": "QEMU", "arch": "x86_64"}, with_disks=False))

    def _state_after_failure(self, ctx: ActionContext, vm: dict[str, Any]) -> dict[str, Any]:
        return {"state": "create_failed"}

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        # Nothing outside the database changed: always safe to run again.
        return Reconciled(Settlement.NOT_STARTED, "interrupted; create_vm has no effect outside the database")


def _spec(ctx: ActionContext, vm: dict[str, Any], host: dict[str, Any], with_disks: bool = True) -> DomainSpec:
    problem = name_problem(vm)
    if problem:
        raise TaskFailed(problem)
    disks = []
    for row in vms_db.vm_disks(ctx.store, vm["id"]) if with_disks else ():
        if row["path"] is None or row["state"] != "available":
            raise TaskFailed(f"VM {vm['id']}: disk volume {row['id']} ({row['name']!r}) is {row['state']}"
                             f"{' and has no path' if row['path'] is None else ''}; create or refresh it first")
        disks.append(Disk(row["path"], row["format"] or "raw"))
    return DomainSpec(
        name=domain_name(vm["description"]),
        uuid=vm["uuid"],
        memory_kib=int(vm["memory_allocated"]),
        vcpus=int(vm["num_vcpus_allocated"]),
        boot_device=vm["boot_device"],
        hypervisor_type=host["hypervisor_type"],
        arch=host.get("arch") or "x86_64",
        machine=ctx.config.machine_type,
        emulator=ctx.config.emulator,
        vnc_listen=ctx.config.vnc_listen,
        mac_address=vm.get("vnic_mac_addr"),
        network=ctx.config.nic_network,
        disks=tuple(disks),
    )


def _running_updates(vm: dict[str, Any], observed: Observed) -> dict[str, Any]:
    values: dict[str, Any] = {
        "state": "running",
        "memory_used": vm["memory_allocated"],
        "num_vcpus_used": vm["num_vcpus_allocated"],
    }
    if observed.host is not None:
        values["host_id"] = observed.host["id"]
    if observed.domain is not None:
        try:
            values["vnc_port"] = vnc_port(observed.domain.XMLDesc(0))
        except libvirt.libvirtError:
            pass
    return values


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
            _spec(ctx, plan.data["vm"], {"hypervisor_type": "TEST"})  # its disks must be ready: fail now if not
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
            _undefine_quietly(leftover.domain)
        try:
            activate_pools(ctx, host, plan.data.get("pools", ()), self.name)  # its disks reachable there first
        except TaskFailed as failure:
            return Outcome.failed(failure.message, RowUpdate("vms", vm["id"], {"state": "stopped", **_NOT_RUNNING}))
        conn = _connect(ctx, host)
        domain = None
        try:
            ctx.ensure_lease()
            domain = conn.defineXML(domain_xml(_spec(ctx, vm, host)))
            ctx.ensure_lease()
            domain.create()
        except libvirt.libvirtError as exc:
            if is_transient(exc):
                ctx.libvirt.drop(host["libvirt_uri"])
                raise TaskRetry(_libvirt_failure("start_vm", host, exc)) from None
            if domain is not None:
                _undefine_quietly(domain)
            return Outcome.failed(_libvirt_failure("start_vm", host, exc),
                                  RowUpdate("vms", vm["id"], {"state": "stopped", **_NOT_RUNNING}))
        observed = Observed("running", f"domain running on {_host_label(host)}", domain, host)
        values = _running_updates(vm, observed)
        values["boot_device"] = "hd"  # a one-off network/cdrom boot does not stick
        return Outcome.finished(None, RowUpdate("vms", vm["id"], values))

    def success_updates(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> list[RowUpdate]:
        return [RowUpdate("vms", vm["id"], _running_updates(vm, observed))]


def _undefine_quietly(domain: libvirt.virDomain) -> None:
    try:
        if not domain.isActive():
            domain.undefine()
    except libvirt.libvirtError:
        pass


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
        _undefine_quietly(domain)

    def success_updates(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> list[RowUpdate]:
        if observed.domain is not None:
            _undefine_quietly(observed.domain)
        return [RowUpdate("vms", vm["id"], {"state": "stopped", **_NOT_RUNNING})]


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
        conn = _connect(ctx, observed.host)
        path = save_path(ctx, vm)
        ctx.ensure_lease()
        conn.restore(path)
        _delete_image(conn, path)

    def success_updates(self, ctx: ActionContext, vm: dict[str, Any], observed: Observed) -> list[RowUpdate]:
        if observed.host is not None and observed.state == "running":
            # Settled after a crash: the restore worked; the image may still be there.
            _delete_image(_connect(ctx, observed.host), save_path(ctx, vm))
        return [RowUpdate("vms", vm["id"], _running_updates(vm, observed))]


def _delete_image(conn: libvirt.virConnect, path: str) -> None:
    """Remove a save image on its node through libvirt's storage API (works for remote nodes).

    The save directory is wrapped in a dir pool; a node whose driver has no
    real storage (the test driver) keeps the file, which is logged.
    """
    try:
        directory = posixpath.dirname(path)
        pool = None
        for candidate in conn.listAllStoragePools(0):
            if _pool_target(candidate) == directory:
                pool = candidate
                break
        if pool is None:
            pool = conn.storagePoolCreateXML(_save_pool_xml(directory), 0)
        pool.refresh(0)
        pool.storageVolLookupByName(posixpath.basename(path)).delete(0)
    except libvirt.libvirtError as exc:
        log.info("save image %s not removed: %s", path, exc.get_error_message())


def _pool_target(pool: libvirt.virStoragePool) -> str | None:
    import xml.etree.ElementTree as ET

    try:
        node = ET.fromstring(pool.XMLDesc(0)).find("target/path")
    except (libvirt.libvirtError, ET.ParseError):
        return None
    return node.text if node is not None else None


def _save_pool_xml(directory: str) -> str:
    import xml.etree.ElementTree as ET

    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = "taskomatic-save-" + directory.strip("/").replace("/", "-")
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = directory
    return ET.tostring(pool, encoding="unicode")


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
