"""The instance in the database: its guard, its row, what an earlier run left, its stop.

Standalone takes the instance guard (an advisory lock) exclusively, so a second
standalone instance on the same database is refused; multihost takes it shared.
Instance ids are never reused, so no old claim can pass for ours.
"""

from __future__ import annotations

import logging
import os
import socket

from taskomatic import __version__
from taskomatic.config import Config
from taskomatic.db import claims, instances, partitions
from taskomatic.db.store import Store

log = logging.getLogger(__name__)

# Shared by every taskomatic: standalone takes it exclusively, multihost shared.
INSTANCE_LOCK_ID = 0x7A5C0002


class StartupRefused(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def take_guard(store: Store, mode: str) -> bool:
    """The instance guard on this connection: exclusive for standalone, shared for multihost."""
    return instances.try_guard(store, INSTANCE_LOCK_ID, exclusive=mode == "standalone")


def guard_holder(store: Store) -> str:
    """Who holds the guard, for the refusal message ("" if nobody is found)."""
    row = instances.guard_holder(store, INSTANCE_LOCK_ID)
    store.rollback()
    if not row:
        return ""
    return f" (database backend pid {row['pid']}, {row['application_name'] or 'unknown application'})"


def register(store: Store, config: Config) -> int:
    """A new instance row; its id."""
    return instances.register_instance(
        store, hostname=socket.gethostname(), pid=os.getpid(), version=__version__, mode=config.mode,
        shards=config.shards, lease_seconds=config.lease_seconds if config.mode == "multihost" else None)


def take_over_leftovers(store: Store, instance_id: int, multihost: bool) -> None:
    """What a dead instance held becomes ours to settle (standalone) or to take over (multihost)."""
    if multihost:
        # Nothing to do here: whoever acquires a partition adopts every task of it another
        # instance had claimed, a dead standalone one's included (adopt_partition_tasks).
        return
    adopted = instances.adopt_orphaned_claims(store, instance_id)
    freed = instances.free_orphaned_partition_leases(store)
    if adopted:
        log.info("took over %d tasks left by an earlier run; they will be settled", adopted)
    if freed:
        log.info("freed %d partition leases left by multihost instances", freed)


def record_stop(store: Store, instance_id: int, multihost: bool) -> None:
    """The instance stops: hand back what never started, free partitions and lease, mark the row."""
    released = claims.release_unstarted(store, instance_id)
    if released:
        log.info("handed back %d claimed tasks", released)
    if multihost:
        # What is left (a parked task still 'running') is for others to take over now.
        partitions.release_idle_partitions(store, instance_id)
        instances.end_lease(store, instance_id)
        partitions.announce_partition_moves(store, instance_id)  # the others balance at once
    instances.mark_stopped(store, instance_id)


# What libpq says when the server answered and refused us: waiting does not help.
_PERMANENT_REFUSALS = (
    "password authentication failed", "authentication failed", "no pg_hba.conf entry",
    "does not exist", "invalid dsn", "invalid connection option", "invalid integer value",
    "invalid port number",
)


def permanent_refusal(reason: str) -> bool:
    lowered = reason.lower()
    return any(phrase in lowered for phrase in _PERMANENT_REFUSALS)
