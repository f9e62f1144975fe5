"""VM rows: read, placed, corrected after the real state. Queries: ``sql/vms.sql``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskomatic.db.store import Row, Store


def get_vm(store: Store, vm_id: int) -> Row | None:
    return store.one("get_vm", vm_id=vm_id)


def vm_disks(store: Store, vm_id: int) -> list[Row]:
    """The VM's disk volumes, in order (id, name, path, state, ...)."""
    return store.all("vm_disks", vm_id=vm_id)


def placement_candidates(store: Store, vm_id: int, memory: int, vcpus: int, lock_id: int) -> list[Row]:
    """Hosts with room for the VM, best first; takes the placement lock (held to the transaction's end)."""
    store.scalar("lock_placement", lock_id=lock_id)
    return store.all("place_vm", vm_id=vm_id, memory=memory, vcpus=vcpus)


def vms_on_host(store: Store, host_id: int) -> list[Row]:
    return store.all("vms_on_host", host_id=host_id)


def idle_vms_on_host(store: Store, host_id: int) -> list[Row]:
    """The host's VMs no task is working on, for the host-status pass."""
    return store.all("idle_vms_on_host", host_id=host_id)


def correct_vm(store: Store, vm_id: int, old_state: str, new_state: str, clear_host: bool, seen: Any) -> bool:
    """Set the VM's state to what its node shows, unless the row changed since ``seen``; True if corrected."""
    return store.one("correct_vm", vm_id=vm_id, old_state=old_state, new_state=new_state, clear_host=clear_host,
                     seen=seen) is not None
