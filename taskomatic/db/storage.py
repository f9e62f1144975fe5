"""Storage pool and volume rows. Queries: ``sql/storage.sql``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskomatic.db.store import Row, Store


def get_storage_pool(store: Store, pool_id: int) -> Row | None:
    return store.one("get_storage_pool", pool_id=pool_id)


def get_storage_volume(store: Store, volume_id: int) -> Row | None:
    return store.one("get_storage_volume", volume_id=volume_id)


def lock_storage_volume(store: Store, volume_id: int) -> bool:
    """Lock the volume's row to the transaction's end; False if it does not exist."""
    return store.one("lock_storage_volume", volume_id=volume_id) is not None


def pool_hosts(store: Store, current_host_id: int | None) -> list[Row]:
    """Available, enabled hosts a pool may be activated on (its current host first)."""
    return store.all("pool_hosts", current_host_id=current_host_id)


def volume_users(store: Store, volume_id: int) -> list[Row]:
    """The VMs using the volume as a disk (vm_id, description, state)."""
    return store.all("volume_users", volume_id=volume_id)


def pool_volume_rows(store: Store, pool_id: int) -> list[Row]:
    return store.all("pool_volume_rows", pool_id=pool_id)


def insert_found_volume(store: Store, pool_id: int, name: str, values: dict[str, Any]) -> bool:
    """A volume found in the pool that has no row: add it (values: size, path, key, format); False if one exists."""
    return bool(store.all("insert_found_volume", pool_id=pool_id, name=name, **values))


def delete_volume_row(store: Store, volume_id: int) -> bool:
    """Delete a volume's row; False if it is still in use (or gone)."""
    return bool(store.all("delete_volume_row", volume_id=volume_id))
