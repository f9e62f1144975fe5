"""Host rows: read, and marked available or unavailable. Queries: ``sql/hosts.sql``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskomatic.db.store import Row, Store


def get_host(store: Store, host_id: int) -> Row | None:
    return store.one("get_host", host_id=host_id)


def all_hosts(store: Store) -> list[Row]:
    return store.all("all_hosts")


def set_host_state(store: Store, host_id: int, state: str) -> bool:
    """Mark the host available or unavailable; True if that changed its state."""
    return store.one("set_host_state", host_id=host_id, state=state) is not None
