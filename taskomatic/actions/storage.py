"""Storage actions on libvirt: refresh_pool, create_volume, delete_volume.

After the oVirt model (shared/reference/ovirt-model.md): refresh_pool starts a
pool on some host and makes ``storage_volumes`` match what the pool holds;
create_volume makes a sparse volume (size in KB) in an available pool;
delete_volume deletes one and removes its row.

Where things run
  A pool is a libvirt storage pool of the same name (``storage_pools.name``)
  on the host in ``storage_pools.host_id``, which refresh_pool chooses: the
  pool's current host while it is available and enabled, else the first
  available, enabled host (by id) that can start it. Once placed, ``dir`` and
  ``logical`` pools are local to their host and never move: on another host
  the "same" directory would be other storage, and every volume would look
  vanished. (Set ``host_id`` to NULL to place such a pool anew.) Shared
  storage (netfs, iscsi) moves to another host when its own is unusable.
  Volume work runs on the pool's host, and needs the pool row ``available``
  and the pool really active there; the ordering key of a volume task is its
  pool (the tasks_set_ordering_key trigger), so it never races its pool's
  refresh.

Row ownership
  refresh_pool leaves ``pending_setup`` and ``pending_deletion`` volume rows
  alone: a create_volume or delete_volume queued behind it owns them.

Writes that the Outcome cannot carry
  refresh_pool inserts rows for volumes it finds, and delete_volume removes
  the row; an Outcome carries only row UPDATEs. Those writes are made in
  ``perform`` in a transaction of their own that first locks the task row and
  checks it is still running under the claim (``claimed_by``, ``attempts``)
  that marked it running, the same fencing the shard's ``record_outcome``
  applies: an instance that lost the task writes nothing.

Failures
  Messages name the action, the pool or volume, the host and libvirt's own
  error. A node that cannot be reached, or a connection that breaks, raises
  TaskRetry (libvirt errors judged by ``libvirt_util.is_transient``): the shard parks
  the pool's key and retries, reconciling first if the task had started.
  refresh_pool tries its candidate hosts in turn and retries only if every
  one failed that way. Anything else fails the task.

Where the work runs and how these writes are fenced: ``storage_sites.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import libvirt
import psycopg2
import psycopg2.extras

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
from taskomatic.actions.libvirt_util import is_transient, libvirt_uri_problem
from taskomatic.actions.pool_xml import (
    BUILDABLE_POOL_TYPES,
    CREATABLE_FORMATS,
    LOCAL_POOL_TYPES,
    PoolSpec,
    identity_differences,
    name_problem,
    pool_xml,
    size_problem,
    volume_xml,
)
from taskomatic.actions.storage_sites import (
    ClaimLost,
    FoundVolume,
    PoolSite,
    capture_claim,
    fenced,
    find_volume,
    host_label,
    kb_of_bytes,
    libvirt_error,
    list_volumes,
    pool_label,
    pool_row,
    pool_site,
    refused,
    sync_volumes,
    volume_label,
    volume_row,
    volume_values,
)
from taskomatic.db import hosts as hosts_db
from taskomatic.db import storage as storage_db
from taskomatic.db.store import Store
from taskomatic.model import TaskRow

log = logging.getLogger(__name__)

# -- actions -----------------------------------------------------------------------------


class StorageAction:
    """Shared: no arguments; one message style."""

    name = ""
    target_types: tuple[str, ...] = ()

    def validate_args(self, args: dict[str, Any]) -> None:
        if args:
            raise TaskFailed(f"{self.name} takes no arguments; got unknown argument(s) "
                             f"{', '.join(sorted(map(str, args)))}")


@dataclass
class ActivePool:
    host: dict[str, Any]
    capacity_kb: int
    allocation_kb: int
    volumes: list[FoundVolume] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


class HostAttemptFailed(Exception):
    """refresh_pool could not activate the pool on one host (``transient``: the node failed)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


class RefreshPool(StorageAction):
    """Start the pool on a suitable host and make its volume rows match libvirt.

    libvirt: storagePoolLookupByName (or storagePoolDefineXML if missing;
    XMLDesc to compare an existing definition), create when inactive (and,
    if that fails, build then create again: dir and netfs only, where build
    creates the target directory), refresh, info, listAllVolumes, and per
    volume name, info, path, key and XMLDesc. A definition it made that
    would not start is undefined again.
    """

    name = "refresh_pool"
    target_types: tuple[str, ...] = ("StoragePool",)

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        pool = pool_row(ctx, task.target_id, self.name)
        try:
            xml = pool_xml(PoolSpec.from_row(pool))
        except ValueError as exc:
            raise TaskFailed(f"refresh_pool: {pool_label(pool)} cannot be defined: {exc}") from None
        hosts = self._candidates(ctx, pool)
        plan = Plan(task, data={"pool": pool, "xml": xml, "hosts": hosts})
        plan.begin_hook = lambda store: capture_claim(store, plan)
        return plan

    def _candidates(self, ctx: ActionContext, pool: dict[str, Any]) -> list[dict[str, Any]]:
        label = pool_label(pool)
        unavailable = [RowUpdate("storage_pools", pool["id"], {"state": "unavailable"})]
        usable = storage_db.pool_hosts(ctx.store, pool["host_id"])
        if pool["pool_type"] in LOCAL_POOL_TYPES and pool["host_id"] is not None:
            current = [h for h in usable if h["id"] == pool["host_id"]]
            if current:
                return current
            host = hosts_db.get_host(ctx.store, pool["host_id"])
            if host is not None:
                why = "disabled" if host["is_disabled"] else host["state"]
                raise TaskFailed(
                    f"refresh_pool: {label} is a {pool['pool_type']} pool, local to {host_label(host)}, "
                    f"which is {why}; its volumes live there, so it does not move to another host. "
                    "Make that host available again, or set storage_pools.host_id to NULL to place "
                    "the pool anew", unavailable)
            usable = storage_db.pool_hosts(ctx.store, None)
        if not usable:
            raise TaskFailed(f"refresh_pool: no available, enabled host to activate {label} on", unavailable)
        return usable

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        pool = plan.data["pool"]
        failures: list[HostAttemptFailed] = []
        active: ActivePool | None = None
        for host in plan.data["hosts"]:
            try:
                active = self._activate(ctx, host, pool, plan.data["xml"])
                break
            except HostAttemptFailed as failure:
                log.warning("%s", failure.message)
                failures.append(failure)
        tried = "; ".join(f.message for f in failures)
        if active is None:
            if all(f.transient for f in failures):
                raise TaskRetry(tried)  # every candidate node failed, none refused: try again later
            return Outcome.failed(tried, RowUpdate("storage_pools", pool["id"], {"state": "unavailable"}))
        try:
            with fenced(ctx.store, plan):
                counts = sync_volumes(ctx.store, pool["id"], active.volumes)
        except ClaimLost as exc:
            return Outcome.failed(f"refresh_pool: {exc}; volume rows not written")
        except psycopg2.Error as exc:
            reason = refused(exc)
            if reason is None:
                raise
            return Outcome.failed(f"refresh_pool: {pool_label(pool)} is active on {host_label(active.host)}, "
                                  f"but the database refused its volume rows: {reason}")
        summary = (f"{pool_label(pool)} active on {host_label(active.host)}: {len(active.volumes)} volume(s); "
                   f"{counts['added']} added, {counts['reappeared']} reappeared, {counts['vanished']} vanished")
        if active.unreadable:
            summary += f"; could not read {len(active.unreadable)}: {', '.join(active.unreadable)}"
        if failures:
            summary += f" (after failing elsewhere: {tried})"
        return Outcome.finished(summary, RowUpdate("storage_pools", pool["id"], {
            "state": "available", "host_id": active.host["id"],
            "capacity": active.capacity_kb, "allocation": active.allocation_kb}))

    def _activate(self, ctx: ActionContext, host: dict[str, Any], pool: dict[str, Any], xml: str) -> ActivePool:
        where = host_label(host)
        problem = libvirt_uri_problem(host["libvirt_uri"])
        if problem:
            raise HostAttemptFailed(f"refresh_pool: {where}: {problem}")
        try:
            conn = ctx.libvirt.get(host["libvirt_uri"])
        except HostUnreachable as exc:
            raise HostAttemptFailed(f"refresh_pool: {where} is unreachable: {exc}", transient=True) from None
        handle: libvirt.virStoragePool | None = None
        defined_here = False
        try:
            try:
                handle = conn.storagePoolLookupByName(pool["name"])
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                    raise
                ctx.ensure_lease()
                handle = conn.storagePoolDefineXML(xml, 0)
                defined_here = True
            else:
                differences = identity_differences(xml, handle.XMLDesc(0))
                if differences:
                    raise HostAttemptFailed(
                        f"refresh_pool: {where} already has a different pool named {pool['name']!r}: "
                        f"{'; '.join(differences)}. Undefine it there, or rename the storage_pools row")
            if not handle.isActive():
                start_pool(ctx, handle, pool["pool_type"])
            handle.refresh(0)
            _state, capacity, allocation, _available = handle.info()
            volumes, unreadable = list_volumes(handle)
        except libvirt.libvirtError as exc:
            transient = is_transient(exc)
            if transient:
                ctx.libvirt.drop(host["libvirt_uri"])
            elif defined_here and handle is not None:
                _undefine_if_inactive(ctx, handle)  # a failed refresh leaves no half-made pool behind
            raise HostAttemptFailed(f"refresh_pool failed on {where} for {pool_label(pool)}: "
                                    f"{exc.get_error_message()}", transient) from None
        return ActivePool(host, kb_of_bytes(capacity), kb_of_bytes(allocation), volumes, unreadable)

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        # A refresh makes the rows match libvirt, whatever state it was left in:
        # running it again is always right, and the only way to know the rows match.
        try:
            pool = pool_row(ctx, task.target_id, self.name)
        except TaskFailed as failure:
            return Reconciled(Settlement.NEITHER, f"interrupted; {failure.message}")
        return Reconciled(Settlement.NOT_STARTED,
                          f"interrupted; refreshing {pool_label(pool)} again (a refresh is repeatable)")


def start_pool(ctx: ActionContext, handle: libvirt.virStoragePool, pool_type: str) -> None:
    """Start an inactive pool, building it first only if it cannot start as it is.

    Building an existing directory is not harmless: libvirt re-applies the
    owner and mode it recorded, which an unprivileged (session) libvirtd may
    not be allowed to do. So: start; if that fails and the type has a safe
    build (it creates the target directory), build and start again.
    """
    try:
        ctx.ensure_lease()
        handle.create(0)
        return
    except libvirt.libvirtError:
        if pool_type not in BUILDABLE_POOL_TYPES:
            raise
    ctx.ensure_lease()
    handle.build(0)  # its error (cannot create path ...) says more than the failed start
    ctx.ensure_lease()
    handle.create(0)


def _undefine_if_inactive(ctx: ActionContext, handle: libvirt.virStoragePool) -> None:
    try:
        if not handle.isActive() and ctx.lease_ok():
            handle.undefine()
    except libvirt.libvirtError:
        pass


def _volume_problem(volume: dict[str, Any]) -> str | None:
    problem = name_problem(volume["name"], "volume name") or size_problem(volume["size"])
    if problem is None and volume["format"] not in CREATABLE_FORMATS:
        problem = (f"format {volume['format']!r} cannot be created "
                   f"(supported: {', '.join(CREATABLE_FORMATS)})")
    return problem


class CreateVolume(StorageAction):
    """pending_setup -> available: a sparse volume of ``size`` KB in its (available) pool.

    A volume of that name already in the pool is a no-op success: the row
    gets its path, key and real size. On failure nothing exists and the row
    keeps its state, so the task can be submitted again.

    libvirt: storagePoolLookupByName, isActive, refresh, storageVolLookupByName,
    createXML (sparse: allocation 0), then path, key, info, XMLDesc.
    """

    name = "create_volume"
    target_types: tuple[str, ...] = ("StorageVolume",)

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        volume = volume_row(ctx, task, self.name)
        problem = _volume_problem(volume)
        if problem:
            raise TaskFailed(f"create_volume: {volume_label(volume)}: {problem}")
        pool = pool_row(ctx, volume["storage_pool_id"], self.name)
        site = pool_site(ctx, pool, self.name)
        existing = find_volume(ctx, site, volume["name"], self.name)
        if existing is not None:
            values = self._values(ctx, site, existing)
            note = "" if values["size"] == volume["size"] else f", not the {volume['size']} KB asked for"
            return Plan(task, already_done=Outcome.finished(
                f"volume {volume['name']!r} already exists in {site.where()} ({values['size']} KB{note}); "
                "nothing to create",
                RowUpdate("storage_volumes", volume["id"], {"state": "available", **values})))
        xml = volume_xml(volume["name"], int(volume["size"]), volume["format"])
        return Plan(task, data={"volume": volume, "site": site, "xml": xml})

    def _values(self, ctx: ActionContext, site: PoolSite, handle: libvirt.virStorageVol) -> dict[str, Any]:
        try:
            return volume_values(handle)
        except libvirt.libvirtError as exc:
            raise libvirt_error(ctx, site.host, exc, f"create_volume: cannot read volume in {site.where()}") from None

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        volume, site = plan.data["volume"], plan.data["site"]
        try:
            try:
                ctx.ensure_lease()
                handle = site.handle.createXML(plan.data["xml"], 0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                    raise
                handle = site.handle.storageVolLookupByName(volume["name"])  # made meanwhile: fine
            values = volume_values(handle)
        except libvirt.libvirtError as exc:
            error = libvirt_error(ctx, site.host, exc, (
                f"create_volume failed on {host_label(site.host)}: cannot create {volume_label(volume)} "
                f"({volume['size']} KB) in {pool_label(site.pool)}"))
            if isinstance(error, TaskRetry):
                raise error from None  # retried after reconcile tells whether it was made
            return Outcome.failed(error.message)
        return Outcome.finished(None, RowUpdate("storage_volumes", volume["id"], {"state": "available", **values}))

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        try:
            volume = volume_row(ctx, task, self.name)
            site = pool_site(ctx, pool_row(ctx, volume["storage_pool_id"], self.name), self.name)
            existing = find_volume(ctx, site, volume["name"], self.name)
            values = self._values(ctx, site, existing) if existing is not None else None
        except TaskFailed as failure:
            return Reconciled(Settlement.NEITHER, f"interrupted, and the real state is unknown: {failure.message}",
                              failure.row_updates)
        if values is not None:
            return Reconciled(Settlement.DONE, f"interrupted, but volume {volume['name']!r} exists in {site.where()}",
                              [RowUpdate("storage_volumes", volume["id"], {"state": "available", **values})])
        return Reconciled(Settlement.NOT_STARTED,
                          f"interrupted before volume {volume['name']!r} was created in {site.where()}")


class DeleteVolume(StorageAction):
    """available -> (row removed): delete the volume in libvirt, then its row.

    Refused while any ``vm_disks`` row names the volume, whatever the VM's
    state: a stopped VM still expects its disk (detach it first). Checked in
    prepare and again, with the volume row locked, in the transaction that
    marks the task running (the row is ``pending_deletion`` from then on).
    A volume already gone from the pool is a success: only the row goes.

    libvirt: storagePoolLookupByName, isActive, refresh, storageVolLookupByName,
    delete.
    """

    name = "delete_volume"
    target_types: tuple[str, ...] = ("StorageVolume",)

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        volume = volume_row(ctx, task, self.name)
        problem = name_problem(volume["name"], "volume name")
        if problem:
            # Never looked up: no volume by such a name can exist in a pool (create_volume refuses it,
            # refresh_pool only finds file names), and it must not name a file outside the pool.
            raise TaskFailed(f"delete_volume: {volume_label(volume)}: {problem}; no such volume can exist "
                             "in a pool (remove the row itself if it is a mistake)")
        self._refuse_if_used(ctx.store, volume)
        pool = pool_row(ctx, volume["storage_pool_id"], self.name)
        site = pool_site(ctx, pool, self.name)
        existing = find_volume(ctx, site, volume["name"], self.name)
        plan = Plan(task, begin_updates=[RowUpdate("storage_volumes", volume["id"], {"state": "pending_deletion"})],
                    data={"volume": volume, "site": site, "existing": existing})
        plan.begin_hook = lambda store: self._begin(store, plan)
        return plan

    def _refuse_if_used(self, store: Store, volume: dict[str, Any]) -> None:
        users = storage_db.volume_users(store, volume["id"])
        if users:
            used_by = ", ".join(f"VM {u['vm_id']} ({u['description']!r}, {u['state']})" for u in users)
            raise TaskFailed(f"delete_volume: {volume_label(volume)} is in use as a disk by {used_by}; "
                             "detach it first")

    def _begin(self, store: Store, plan: Plan) -> None:
        volume = plan.data["volume"]
        if not storage_db.lock_storage_volume(store, volume["id"]):
            raise TaskFailed(f"delete_volume: storage volume {volume['id']} does not exist")
        self._refuse_if_used(store, volume)  # a disk attached since prepare
        capture_claim(store, plan)

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        volume, site = plan.data["volume"], plan.data["site"]
        handle: libvirt.virStorageVol | None = plan.data["existing"]
        note = None
        if handle is None:
            note = f"volume {volume['name']!r} was already gone from {site.where()}; removed its row"
        else:
            try:
                ctx.ensure_lease()
                handle.delete(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    error = libvirt_error(ctx, site.host, exc, (
                        f"delete_volume failed on {host_label(site.host)}: cannot delete {volume_label(volume)} "
                        f"in {pool_label(site.pool)}"))
                    if isinstance(error, TaskRetry):
                        raise error from None  # retried after reconcile tells whether it was deleted
                    return Outcome.failed(error.message, RowUpdate(
                        "storage_volumes", volume["id"], {"state": self._state_now(ctx, site, volume)}))
                note = f"volume {volume['name']!r} disappeared from {site.where()} meanwhile; removed its row"
        try:
            with fenced(ctx.store, plan):
                removed = storage_db.delete_volume_row(ctx.store, volume["id"])
                users = [] if removed else storage_db.volume_users(ctx.store, volume["id"])
                if not removed:
                    ctx.store.update_row("storage_volumes", volume["id"], {"state": "vanished"})
        except ClaimLost as exc:
            return Outcome.failed(f"delete_volume: {exc}; the volume row was not removed")
        except psycopg2.Error as exc:
            reason = refused(exc)
            if reason is None:
                raise
            return Outcome.failed(f"delete_volume: deleted volume {volume['name']!r} from {site.where()}, "
                                  f"but the database refused to remove its row: {reason}")
        if not removed:
            used_by = ", ".join(f"VM {u['vm_id']}" for u in users)
            return Outcome.finished(f"deleted volume {volume['name']!r} from {site.where()}, but {used_by} "
                                    "attached it meanwhile; its row is kept, marked vanished")
        return Outcome.finished(note)

    def _state_now(self, ctx: ActionContext, site: PoolSite, volume: dict[str, Any]) -> str:
        """The row state after a failed delete: what the pool really holds."""
        try:
            return "available" if find_volume(ctx, site, volume["name"], self.name) is not None else "vanished"
        except (TaskFailed, TaskRetry):
            return "unavailable"

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        if task.target_id is not None and storage_db.get_storage_volume(ctx.store, task.target_id) is None:
            return Reconciled(Settlement.DONE, f"interrupted, but storage volume {task.target_id} is already removed")
        try:
            volume = volume_row(ctx, task, self.name)
            site = pool_site(ctx, pool_row(ctx, volume["storage_pool_id"], self.name), self.name)
            existing = find_volume(ctx, site, volume["name"], self.name)
        except TaskFailed as failure:
            updates = list(failure.row_updates)
            if task.target_id is not None:
                updates.append(RowUpdate("storage_volumes", task.target_id, {"state": "unavailable"}))
            return Reconciled(Settlement.NEITHER, f"interrupted, and the real state is unknown: {failure.message}",
                              updates)
        if existing is not None:
            return Reconciled(Settlement.NOT_STARTED,
                              f"interrupted before volume {volume['name']!r} was deleted from {site.where()}")
        # Gone in libvirt, row still here: running again removes the row (and
        # only the row), under this claim's fencing.
        return Reconciled(Settlement.NOT_STARTED,
                          f"interrupted after volume {volume['name']!r} was deleted from {site.where()}; "
                          "running again to remove its row")


ACTIONS: list[Action] = [RefreshPool(), CreateVolume(), DeleteVolume()]
