"""Where storage work runs, and the writes storage actions make themselves.

A pool's *site* is its host and the libvirt pool there (``pool_site``); volume
rows are synchronised with what the pool lists (``sync_volumes``). The rows an
Outcome cannot carry (volumes found, a deleted volume's row) are written in a
transaction that first checks the task still runs under the claim that started
it (``fenced``), the same fencing the shard applies to outcomes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import libvirt
import psycopg2
import psycopg2.extras

from taskomatic.actions.base import (
    ActionContext,
    Plan,
    RowUpdate,
    TaskFailed,
    TaskRetry,
)
from taskomatic.actions.connections import HostUnreachable
from taskomatic.actions.libvirt_util import is_transient, libvirt_uri_problem
from taskomatic.actions.pool_xml import (
    volume_format,
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


def capture_claim(store: Store, plan: Plan) -> None:
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


def host_label(host: dict[str, Any]) -> str:
    return f"host {host['id']} ({host['hostname']})"


def pool_label(pool: dict[str, Any]) -> str:
    return f"pool {pool['id']} ({quoted(pool['name'])})"


def volume_label(volume: dict[str, Any]) -> str:
    return f"volume {volume['id']} ({quoted(volume['name'])})"


def pool_row(ctx: ActionContext, pool_id: int | None, action: str) -> dict[str, Any]:
    if pool_id is None:
        raise TaskFailed(f"{action}: task_target_id is NULL; a StoragePool task needs the pool's id")
    pool = storage_db.get_storage_pool(ctx.store, pool_id)
    if pool is None:
        raise TaskFailed(f"{action}: storage pool {pool_id} does not exist")
    return pool


def volume_row(ctx: ActionContext, task: TaskRow, action: str) -> dict[str, Any]:
    if task.target_id is None:
        raise TaskFailed(f"{action}: task_target_id is NULL; a StorageVolume task needs the volume's id")
    volume = storage_db.get_storage_volume(ctx.store, task.target_id)
    if volume is None:
        raise TaskFailed(f"{action}: storage volume {task.target_id} does not exist")
    return volume


def connect_host(ctx: ActionContext, host: dict[str, Any], action: str) -> libvirt.virConnect:
    """The host's connection; an unreachable node is transient (the shard retries later)."""
    problem = libvirt_uri_problem(host["libvirt_uri"])
    if problem:
        raise TaskFailed(f"{action}: {host_label(host)}: {problem}")
    try:
        return ctx.libvirt.get(host["libvirt_uri"])
    except HostUnreachable as exc:
        raise TaskRetry(f"{action}: {host_label(host)} is unreachable: {exc}") from None


def libvirt_error(ctx: ActionContext, host: dict[str, Any], exc: libvirt.libvirtError,
                   message: str) -> TaskFailed | TaskRetry:
    """What a libvirt error means for the task: TaskRetry if the node or the way
    to it failed (the connection is dropped, to be reopened), else TaskFailed."""
    text = f"{message}: {exc.get_error_message()}"
    if is_transient(exc):
        ctx.libvirt.drop(host["libvirt_uri"])
        return TaskRetry(text)
    return TaskFailed(text)


def kb_of_bytes(size_bytes: int) -> int:
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
        return f"{pool_label(self.pool)} on {host_label(self.host)}"


def pool_site(ctx: ActionContext, pool: dict[str, Any], action: str) -> PoolSite:
    """The pool active on its host, freshly refreshed; TaskFailed says why not.

    A pool that turns out undefined or inactive is corrected to ``unavailable``
    (the failure's row updates): refresh_pool brings it back. An unreachable
    node raises TaskRetry: the shard tries again later.
    """
    label = pool_label(pool)
    if pool["state"] != "available":
        raise TaskFailed(f"{action}: {label} is {pool['state']}, not available; run refresh_pool first")
    if pool["host_id"] is None:
        raise TaskFailed(f"{action}: {label} is not active on any host (its host was removed); "
                         "run refresh_pool first")
    host = hosts_db.get_host(ctx.store, pool["host_id"])
    if host is None:
        raise TaskFailed(f"{action}: host {pool['host_id']} of {label} no longer exists; run refresh_pool first")
    unavailable = [RowUpdate("storage_pools", pool["id"], {"state": "unavailable"})]
    where = f"{label} on {host_label(host)}"
    conn = connect_host(ctx, host, action)
    try:
        handle = conn.storagePoolLookupByName(pool["name"])
        if not handle.isActive():
            raise TaskFailed(f"{action}: {where} is not active; run refresh_pool to start it", unavailable)
        handle.refresh(0)  # see volumes changed behind libvirt's back (files added or removed)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise TaskFailed(f"{action}: {label} is not defined on {host_label(host)}; "
                             "run refresh_pool to define and start it", unavailable) from None
        raise libvirt_error(ctx, host, exc, f"{action}: cannot read {where}") from None
    return PoolSite(pool, host, handle)


def find_volume(ctx: ActionContext, site: PoolSite, name: str, action: str) -> libvirt.virStorageVol | None:
    """The named volume in the pool, or None if the pool has none by that name."""
    try:
        return site.handle.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise libvirt_error(ctx, site.host, exc,
                             f"{action}: cannot look up volume {name!r} in {site.where()}") from None


def volume_values(volume: libvirt.virStorageVol) -> dict[str, Any]:
    """Row values read from a libvirt volume: size (KB), path, key, format."""
    _type, capacity, _allocation = volume.info()
    return {"size": kb_of_bytes(capacity), "path": volume.path(), "key": volume.key(),
            "format": volume_format(volume.XMLDesc(0)) or "raw"}


@dataclass
class FoundVolume:
    name: str
    size: int
    path: str
    key: str
    format: str



def list_volumes(handle: libvirt.virStoragePool) -> tuple[list[FoundVolume], list[str]]:
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
