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
  TaskRetry (libvirt errors judged by ``vm.is_transient``): the shard parks
  the pool's key and retries, reconciling first if the task had started.
  refresh_pool tries its candidate hosts in turn and retries only if every
  one failed that way. Anything else fails the task.

The SQL lives here until it moves into queries.sql.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
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
    volume_format,
    volume_xml,
)
from taskomatic.db import hosts as hosts_db
from taskomatic.db import storage as storage_db
from taskomatic.db import task_writes
from taskomatic.db.store import Store
from taskomatic.model import TaskRow
from taskomatic.text import first_line, quoted

log = logging.getLogger(__name__)

# -- fencing for writes made in perform ------------------------------------------------


class ClaimLost(Exception):
    """The task is no longer running under the claim that started it."""


def refused(exc: psycopg2.Error) -> str | None:
    """The database's reason for refusing a write, or None for a lost connection.

    A lost connection is not the task's fault: it propagates, the shard exits,
    and its replacement reconciles the task.
    """
    if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
        return None
    return first_line(exc)


def _capture_claim(store: Store, plan: Plan) -> None:
    """In the mark-running transaction: remember the claim that marked it running."""
    row = task_writes.task_claim(store, plan.task.id)
    plan.data["claim"] = (row["claimed_by"], row["attempts"]) if row else None


@contextmanager
def fenced(store: Store, plan: Plan) -> Iterator[None]:
    """One transaction that runs only while the task is still ours; commits on success."""
    claim = plan.data.get("claim")
    try:
        held = claim is not None and task_writes.hold_running_task(store, plan.task.id, claimed_by=claim[0],
                                                                   attempts=claim[1])
        if not held:
            raise ClaimLost(f"task {plan.task.id} is no longer running under this claim")
        yield
    except BaseException:
        if not store.conn.closed:
            store.rollback()
        raise
    else:
        store.commit()


# -- rows and labels ------------------------------------------------------------------


def _host_label(host: dict[str, Any]) -> str:
    return f"host {host['id']} ({host['hostname']})"


def _pool_label(pool: dict[str, Any]) -> str:
    return f"pool {pool['id']} ({quoted(pool['name'])})"


def _volume_label(volume: dict[str, Any]) -> str:
    return f"volume {volume['id']} ({quoted(volume['name'])})"


def _pool_row(ctx: ActionContext, pool_id: int | None, action: str) -> dict[str, Any]:
    if pool_id is None:
        raise TaskFailed(f"{action}: task_target_id is NULL; a StoragePool task needs the pool's id")
    pool = storage_db.get_storage_pool(ctx.store, pool_id)
    if pool is None:
        raise TaskFailed(f"{action}: storage pool {pool_id} does not exist")
    return pool


def _volume_row(ctx: ActionContext, task: TaskRow, action: str) -> dict[str, Any]:
    if task.target_id is None:
        raise TaskFailed(f"{action}: task_target_id is NULL; a StorageVolume task needs the volume's id")
    volume = storage_db.get_storage_volume(ctx.store, task.target_id)
    if volume is None:
        raise TaskFailed(f"{action}: storage volume {task.target_id} does not exist")
    return volume


def _connect(ctx: ActionContext, host: dict[str, Any], action: str) -> libvirt.virConnect:
    """The host's connection; an unreachable node is transient (the shard retries later)."""
    problem = libvirt_uri_problem(host["libvirt_uri"])
    if problem:
        raise TaskFailed(f"{action}: {_host_label(host)}: {problem}")
    try:
        return ctx.libvirt.get(host["libvirt_uri"])
    except HostUnreachable as exc:
        raise TaskRetry(f"{action}: {_host_label(host)} is unreachable: {exc}") from None


def _libvirt_error(ctx: ActionContext, host: dict[str, Any], exc: libvirt.libvirtError,
                   message: str) -> TaskFailed | TaskRetry:
    """What a libvirt error means for the task: TaskRetry if the node or the way
    to it failed (the connection is dropped, to be reopened), else TaskFailed."""
    text = f"{message}: {exc.get_error_message()}"
    if is_transient(exc):
        ctx.libvirt.drop(host["libvirt_uri"])
        return TaskRetry(text)
    return TaskFailed(text)


def _kb(size_bytes: int) -> int:
    """Bytes to KB, rounded up: a row never understates what a volume holds."""
    return (int(size_bytes) + 1023) // 1024


# -- the pool on its host ---------------------------------------------------------------


@dataclass
class PoolSite:
    """A pool found active on its host."""

    pool: dict[str, Any]
    host: dict[str, Any]
    handle: libvirt.virStoragePool

    def where(self) -> str:
        return f"{_pool_label(self.pool)} on {_host_label(self.host)}"


def pool_site(ctx: ActionContext, pool: dict[str, Any], action: str) -> PoolSite:
    """The pool active on its host, freshly refreshed; TaskFailed says why not.

    A pool that turns out undefined or inactive is corrected to ``unavailable``
    (the failure's row updates): refresh_pool brings it back. An unreachable
    node raises TaskRetry: the shard tries again later.
    """
    label = _pool_label(pool)
    if pool["state"] != "available":
        raise TaskFailed(f"{action}: {label} is {pool['state']}, not available; run refresh_pool first")
    if pool["host_id"] is None:
        raise TaskFailed(f"{action}: {label} is not active on any host (its host was removed); "
                         "run refresh_pool first")
    host = hosts_db.get_host(ctx.store, pool["host_id"])
    if host is None:
        raise TaskFailed(f"{action}: host {pool['host_id']} of {label} no longer exists; run refresh_pool first")
    unavailable = [RowUpdate("storage_pools", pool["id"], {"state": "unavailable"})]
    where = f"{label} on {_host_label(host)}"
    conn = _connect(ctx, host, action)
    try:
        handle = conn.storagePoolLookupByName(pool["name"])
        if not handle.isActive():
            raise TaskFailed(f"{action}: {where} is not active; run refresh_pool to start it", unavailable)
        handle.refresh(0)  # see volumes changed behind libvirt's back (files added or removed)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise TaskFailed(f"{action}: {label} is not defined on {_host_label(host)}; "
                             "run refresh_pool to define and start it", unavailable) from None
        raise _libvirt_error(ctx, host, exc, f"{action}: cannot read {where}") from None
    return PoolSite(pool, host, handle)


def find_volume(ctx: ActionContext, site: PoolSite, name: str, action: str) -> libvirt.virStorageVol | None:
    """The named volume in the pool, or None if the pool has none by that name."""
    try:
        return site.handle.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise _libvirt_error(ctx, site.host, exc,
                             f"{action}: cannot look up volume {name!r} in {site.where()}") from None


def volume_values(volume: libvirt.virStorageVol) -> dict[str, Any]:
    """Row values read from a libvirt volume: size (KB), path, key, format."""
    _type, capacity, _allocation = volume.info()
    return {"size": _kb(capacity), "path": volume.path(), "key": volume.key(),
            "format": volume_format(volume.XMLDesc(0)) or "raw"}


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
class FoundVolume:
    name: str
    size: int
    path: str
    key: str
    format: str


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
        pool = _pool_row(ctx, task.target_id, self.name)
        try:
            xml = pool_xml(PoolSpec.from_row(pool))
        except ValueError as exc:
            raise TaskFailed(f"refresh_pool: {_pool_label(pool)} cannot be defined: {exc}") from None
        hosts = self._candidates(ctx, pool)
        plan = Plan(task, data={"pool": pool, "xml": xml, "hosts": hosts})
        plan.begin_hook = lambda store: _capture_claim(store, plan)
        return plan

    def _candidates(self, ctx: ActionContext, pool: dict[str, Any]) -> list[dict[str, Any]]:
        label = _pool_label(pool)
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
                    f"refresh_pool: {label} is a {pool['pool_type']} pool, local to {_host_label(host)}, "
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
            return Outcome.failed(f"refresh_pool: {_pool_label(pool)} is active on {_host_label(active.host)}, "
                                  f"but the database refused its volume rows: {reason}")
        summary = (f"{_pool_label(pool)} active on {_host_label(active.host)}: {len(active.volumes)} volume(s); "
                   f"{counts['added']} added, {counts['reappeared']} reappeared, {counts['vanished']} vanished")
        if active.unreadable:
            summary += f"; could not read {len(active.unreadable)}: {', '.join(active.unreadable)}"
        if failures:
            summary += f" (after failing elsewhere: {tried})"
        return Outcome.finished(summary, RowUpdate("storage_pools", pool["id"], {
            "state": "available", "host_id": active.host["id"],
            "capacity": active.capacity_kb, "allocation": active.allocation_kb}))

    def _activate(self, ctx: ActionContext, host: dict[str, Any], pool: dict[str, Any], xml: str) -> ActivePool:
        where = _host_label(host)
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
                handle = conn.storagePoolDefineXML(xml, 0)
                defined_here = True
            else:
                differences = identity_differences(xml, handle.XMLDesc(0))
                if differences:
                    raise HostAttemptFailed(
                        f"refresh_pool: {where} already has a different pool named {pool['name']!r}: "
                        f"{'; '.join(differences)}. Undefine it there, or rename the storage_pools row")
            if not handle.isActive():
                _start(handle, pool["pool_type"])
            handle.refresh(0)
            _state, capacity, allocation, _available = handle.info()
            volumes, unreadable = _list_volumes(handle)
        except libvirt.libvirtError as exc:
            transient = is_transient(exc)
            if transient:
                ctx.libvirt.drop(host["libvirt_uri"])
            elif defined_here and handle is not None:
                _undefine_if_inactive(handle)  # a failed refresh leaves no half-made pool behind
            raise HostAttemptFailed(f"refresh_pool failed on {where} for {_pool_label(pool)}: "
                                    f"{exc.get_error_message()}", transient) from None
        return ActivePool(host, _kb(capacity), _kb(allocation), volumes, unreadable)

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        # A refresh makes the rows match libvirt, whatever state it was left in:
        # running it again is always right, and the only way to know the rows match.
        try:
            pool = _pool_row(ctx, task.target_id, self.name)
        except TaskFailed as failure:
            return Reconciled(Settlement.NEITHER, f"interrupted; {failure.message}")
        return Reconciled(Settlement.NOT_STARTED,
                          f"interrupted; refreshing {_pool_label(pool)} again (a refresh is repeatable)")


def _start(handle: libvirt.virStoragePool, pool_type: str) -> None:
    """Start an inactive pool, building it first only if it cannot start as it is.

    Building an existing directory is not harmless: libvirt re-applies the
    owner and mode it recorded, which an unprivileged (session) libvirtd may
    not be allowed to do. So: start; if that fails and the type has a safe
    build (it creates the target directory), build and start again.
    """
    try:
        handle.create(0)
        return
    except libvirt.libvirtError:
        if pool_type not in BUILDABLE_POOL_TYPES:
            raise
    handle.build(0)  # its error (cannot create path ...) says more than the failed start
    handle.create(0)


def _undefine_if_inactive(handle: libvirt.virStoragePool) -> None:
    try:
        if not handle.isActive():
            handle.undefine()
    except libvirt.libvirtError:
        pass


def _list_volumes(handle: libvirt.virStoragePool) -> tuple[list[FoundVolume], list[str]]:
    found: list[FoundVolume] = []
    unreadable: list[str] = []
    for volume in handle.listAllVolumes(0):
        try:
            name = volume.name()
            values = volume_values(volume)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                continue  # removed while we listed
            raise
        except UnicodeError:  # a file name that is not UTF-8 cannot be a row (nor be named here)
            unreadable.append("a volume whose name is not UTF-8")
            continue
        if "\0" in name:
            unreadable.append(repr(name))
            continue
        found.append(FoundVolume(name=name, **values))
    return found, unreadable


def sync_volumes(store: Store, pool_id: int, volumes: list[FoundVolume]) -> dict[str, int]:
    """Make the pool's volume rows match what libvirt listed. Caller commits."""
    rows = storage_db.pool_volume_rows(store, pool_id)
    by_name = {row["name"]: row for row in rows}
    listed = {volume.name for volume in volumes}
    counts = {"added": 0, "reappeared": 0, "vanished": 0}
    for volume in volumes:
        row = by_name.get(volume.name)
        values = {"size": volume.size, "path": volume.path, "key": volume.key, "format": volume.format}
        if row is None:
            if storage_db.insert_found_volume(store, pool_id, volume.name, values):
                counts["added"] += 1
            continue
        if row["state"] in ("pending_setup", "pending_deletion"):
            continue  # a queued create_volume / delete_volume owns it
        if row["state"] != "available":
            counts["reappeared"] += 1
        wanted = {"state": "available", **values}
        changed = {k: v for k, v in wanted.items() if row[k] != v}
        store.update_row("storage_volumes", row["id"], changed)
    for row in rows:
        if row["name"] not in listed and row["state"] in ("available", "unavailable"):
            store.update_row("storage_volumes", row["id"], {"state": "vanished"})
            counts["vanished"] += 1
    return counts


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
        volume = _volume_row(ctx, task, self.name)
        problem = _volume_problem(volume)
        if problem:
            raise TaskFailed(f"create_volume: {_volume_label(volume)}: {problem}")
        pool = _pool_row(ctx, volume["storage_pool_id"], self.name)
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
            raise _libvirt_error(ctx, site.host, exc, f"create_volume: cannot read volume in {site.where()}") from None

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        volume, site = plan.data["volume"], plan.data["site"]
        try:
            try:
                handle = site.handle.createXML(plan.data["xml"], 0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                    raise
                handle = site.handle.storageVolLookupByName(volume["name"])  # made meanwhile: fine
            values = volume_values(handle)
        except libvirt.libvirtError as exc:
            error = _libvirt_error(ctx, site.host, exc, (
                f"create_volume failed on {_host_label(site.host)}: cannot create {_volume_label(volume)} "
                f"({volume['size']} KB) in {_pool_label(site.pool)}"))
            if isinstance(error, TaskRetry):
                raise error from None  # retried after reconcile tells whether it was made
            return Outcome.failed(error.message)
        return Outcome.finished(None, RowUpdate("storage_volumes", volume["id"], {"state": "available", **values}))

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        try:
            volume = _volume_row(ctx, task, self.name)
            site = pool_site(ctx, _pool_row(ctx, volume["storage_pool_id"], self.name), self.name)
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
        volume = _volume_row(ctx, task, self.name)
        problem = name_problem(volume["name"], "volume name")
        if problem:
            # Never looked up: no volume by such a name can exist in a pool (create_volume refuses it,
            # refresh_pool only finds file names), and it must not name a file outside the pool.
            raise TaskFailed(f"delete_volume: {_volume_label(volume)}: {problem}; no such volume can exist "
                             "in a pool (remove the row itself if it is a mistake)")
        self._refuse_if_used(ctx.store, volume)
        pool = _pool_row(ctx, volume["storage_pool_id"], self.name)
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
            raise TaskFailed(f"delete_volume: {_volume_label(volume)} is in use as a disk by {used_by}; "
                             "detach it first")

    def _begin(self, store: Store, plan: Plan) -> None:
        volume = plan.data["volume"]
        if not storage_db.lock_storage_volume(store, volume["id"]):
            raise TaskFailed(f"delete_volume: storage volume {volume['id']} does not exist")
        self._refuse_if_used(store, volume)  # a disk attached since prepare
        _capture_claim(store, plan)

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        volume, site = plan.data["volume"], plan.data["site"]
        handle: libvirt.virStorageVol | None = plan.data["existing"]
        note = None
        if handle is None:
            note = f"volume {volume['name']!r} was already gone from {site.where()}; removed its row"
        else:
            try:
                handle.delete(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    error = _libvirt_error(ctx, site.host, exc, (
                        f"delete_volume failed on {_host_label(site.host)}: cannot delete {_volume_label(volume)} "
                        f"in {_pool_label(site.pool)}"))
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
            volume = _volume_row(ctx, task, self.name)
            site = pool_site(ctx, _pool_row(ctx, volume["storage_pool_id"], self.name), self.name)
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
