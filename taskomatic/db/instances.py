"""The instances table and the instance guard: who runs, since when, under which lease.

Standalone takes the guard (an advisory lock) exclusively, multihost shares it.
Queries: ``sql/instances.sql``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskomatic.db.store import Row, Store


def register_instance(store: Store, hostname: str, pid: int, version: str, mode: str, shards: int,
                      lease_seconds: float | None) -> int:
    """A new instance row (ids are never reused); its id. ``lease_seconds``: multihost only."""
    return int(store.scalar("register_instance", hostname=hostname, pid=pid, version=version, mode=mode,
                            shards=shards, lease=lease_seconds))


def heartbeat(store: Store, instance_id: int) -> None:
    store.run("instance_heartbeat", instance_id=instance_id)


def mark_stopped(store: Store, instance_id: int) -> None:
    store.run("instance_stopped", instance_id=instance_id)


def try_guard(store: Store, lock_id: int, exclusive: bool) -> bool:
    """Take the instance guard on this connection (exclusive: standalone); False if another holds it."""
    if exclusive:
        return bool(store.scalar("try_standalone_guard", lock_id=lock_id))
    return bool(store.scalar("try_multihost_guard", lock_id=lock_id))


def guard_holder(store: Store, lock_id: int) -> Row | None:
    """The database session holding the guard (pid, client_addr, application_name), if any."""
    return store.one("guard_holder", lock_id=lock_id)


def adopt_orphaned_claims(store: Store, instance_id: int) -> int:
    """Standalone start: the tasks an earlier instance held become ours; how many."""
    return store.run("adopt_orphaned_claims", instance_id=instance_id)


def free_orphaned_partition_leases(store: Store) -> int:
    """Standalone start: partition leases left by multihost instances are freed; how many rows changed."""
    return store.run("free_orphaned_partition_leases")


def renew_lease(store: Store, instance_id: int, lease_seconds: float) -> bool:
    """Extend the instance's lease; False if the database says it ran out (lost)."""
    return store.one("renew_lease", instance_id=instance_id, lease=lease_seconds) is not None


def end_lease(store: Store, instance_id: int) -> None:
    store.run("end_lease", instance_id=instance_id)


def limit_idle_transaction(store: Store, milliseconds: int) -> None:
    """This transaction may sit idle at most this long (a frozen process's locks last at most a lease).

    Sent with the transaction's first statement: no round trip of its own."""
    store.send_with_next("limit_idle_transaction", ms=milliseconds)
