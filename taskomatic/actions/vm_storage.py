"""A VM's storage and its host: which hosts reach its disks, and making its pools active there.

A pool is *shared* (every host reaches the same volumes: netfs, iscsi, and a
dir pool the administrator marks ``storage_pools.shared``, i.e. a path mounted
on every host) or *local* to ``storage_pools.host_id`` (dir, logical). So a VM
may run only on a host that reaches every pool of its disks: anywhere if all are
shared, else on the one host its local pools live on. A local pool that has no
host yet is placed with the first VM that uses it.

Before a VM starts or arrives on a host, each of its pools is made active
there: looked up by name (defined from the row if missing), started if
inactive, and refreshed so libvirt knows the volume paths.

migrate_vm refuses a VM with a disk on a local pool: the disk cannot follow it,
and taskomatic does not copy storage during migration (libvirt's
VIR_MIGRATE_NON_SHARED_DISK copies into a volume that must already exist on the
destination, which the pool model cannot promise). Shut the VM down and move
its volume, or keep its disks on shared pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import libvirt

from taskomatic.actions.base import ActionContext, TaskFailed, TaskRetry
from taskomatic.actions.connections import HostUnreachable
from taskomatic.actions.libvirt_util import is_transient, libvirt_uri_problem
from taskomatic.actions.pool_xml import PoolSpec, identity_differences, pool_xml
from taskomatic.actions.storage import start_pool
from taskomatic.text import quoted

# Pool types whose volumes every host reaches, whatever the row says.
SHARED_POOL_TYPES = frozenset({"netfs", "iscsi"})


def is_shared(pool: dict[str, Any]) -> bool:
    """True if every host reaches the pool's volumes (a dir pool only when marked shared)."""
    return pool["pool_type"] in SHARED_POOL_TYPES or (pool["pool_type"] == "dir" and bool(pool.get("shared")))


def pool_label(pool: dict[str, Any]) -> str:
    return f"pool {pool['id']} ({quoted(pool['name'])})"


def _pool_host_label(pool: dict[str, Any]) -> str:
    name = pool.get("host_name")
    return f"host {pool['host_id']}" + (f" ({name})" if name else "")


@dataclass(frozen=True)
class StorageNeeds:
    """Where a VM's disks let it run."""

    pools: tuple[dict[str, Any], ...]
    # The host every placed local pool lives on; None: no placed local pool (any host will do).
    local_host_id: int | None = None

    @property
    def local_pools(self) -> list[dict[str, Any]]:
        return [p for p in self.pools if not is_shared(p)]

    @property
    def unplaced_local_pools(self) -> list[dict[str, Any]]:
        return [p for p in self.local_pools if p["host_id"] is None]

    def allows(self, host_id: int) -> bool:
        return self.local_host_id is None or self.local_host_id == host_id

    def describe_local(self) -> str:
        """'pool 3 ('images') on host 1 (node0)' for each placed local pool."""
        return ", ".join(f"{pool_label(p)} on {_pool_host_label(p)}" for p in self.local_pools
                         if p["host_id"] is not None)


def storage_needs(vm_id: int, pools: Sequence[dict[str, Any]]) -> StorageNeeds:
    """The hosts a VM's disks allow; TaskFailed if its local pools sit on two different hosts."""
    needs = StorageNeeds(tuple(pools))
    homes = {p["host_id"] for p in needs.local_pools if p["host_id"] is not None}
    if len(homes) > 1:
        raise TaskFailed(f"VM {vm_id}: its disks sit on local pools of different hosts ({needs.describe_local()}); "
                         "no host reaches them all. Move the volumes to one host or to a shared pool")
    return StorageNeeds(tuple(pools), homes.pop() if homes else None)


def activate_pools(ctx: ActionContext, host: dict[str, Any], pools: Sequence[dict[str, Any]], action: str) -> None:
    """Make every pool active on ``host`` and refreshed; TaskFailed (or TaskRetry for a node fault) if not.

    libvirt per pool: storagePoolLookupByName (storagePoolDefineXML when the host
    does not know it; XMLDesc to check a known one is the same pool), isActive,
    create (build, then create again, for dir and netfs), refresh.
    """
    if not pools:
        return
    where = f"host {host['id']} ({host['hostname']})"
    problem = libvirt_uri_problem(host["libvirt_uri"])
    if problem:
        raise TaskFailed(f"{action}: {where}: {problem}")
    try:
        conn = ctx.libvirt.get(host["libvirt_uri"])
    except HostUnreachable as exc:
        raise TaskRetry(f"{action}: {where} is unreachable: {exc}") from None
    for pool in pools:
        try:
            xml = pool_xml(PoolSpec.from_row(pool))
        except ValueError as exc:
            raise TaskFailed(f"{action}: {pool_label(pool)} cannot be defined on {where}: {exc}") from None
        try:
            _activate(ctx, conn, pool, xml, where, action)
        except libvirt.libvirtError as exc:
            message = f"{action}: cannot activate {pool_label(pool)} on {where}: {exc.get_error_message()}"
            if is_transient(exc):
                ctx.libvirt.drop(host["libvirt_uri"])
                raise TaskRetry(message) from None
            raise TaskFailed(message) from None


def _activate(ctx: ActionContext, conn: libvirt.virConnect, pool: dict[str, Any], xml: str, where: str,
              action: str) -> None:
    try:
        handle = conn.storagePoolLookupByName(pool["name"])
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise
        ctx.ensure_lease()
        handle = conn.storagePoolDefineXML(xml, 0)
    else:
        differences = identity_differences(xml, handle.XMLDesc(0))
        if differences:
            raise TaskFailed(f"{action}: {where} already has a different pool named {pool['name']!r}: "
                             f"{'; '.join(differences)}")
    if not handle.isActive():
        start_pool(ctx, handle, pool["pool_type"])
    handle.refresh(0)
