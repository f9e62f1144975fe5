"""Where a VM's disks live, and where its domain really runs (queries in sql/storage_placement.sql)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from taskomatic.db.store import Row, Store


def vm_disk_pools(store: Store, vm_id: int) -> list[Row]:
    """The pools that hold one of the VM's disks, each once."""
    return store.all("vm_disk_pools", vm_id=vm_id)


def place_local_pool(store: Store, pool_id: int, host_id: int) -> bool:
    """Make an unplaced local pool local to ``host_id``; False if it already had a host."""
    return store.one("place_local_pool", pool_id=pool_id, host_id=host_id) is not None


def idle_vms(store: Store) -> list[Row]:
    """Every VM with no task running (id, uuid, description, state, host_id, updated_at)."""
    return store.all("idle_vms")


def record_vm_location(store: Store, vm_id: int, host_id: int, state: str, seen: datetime) -> bool:
    """Record that the VM's domain runs on ``host_id`` in ``state``; False if a task or a change came first."""
    return store.one("record_vm_location", vm_id=vm_id, host_id=host_id, state=state, seen=seen) is not None


def forget_lost_save(store: Store, vm_id: int, seen: Any) -> bool:
    """A saved VM whose image is gone becomes stopped, on no host; False if a task or a change came first."""
    return store.one("forget_lost_save", vm_id=vm_id, seen=seen) is not None
