"""Claiming tasks and handing them back: what an instance holds.

Standalone claims tasks in bulk (oldest first); multihost claims the tasks of
the partitions it holds, the same way (``db/partitions.py``). Queries: ``sql/claims.sql``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskomatic.db.store import Row, Store


def claim_tasks(store: Store, instance_id: int, limit: int, last: bool = False) -> list[Row]:
    """Claim up to ``limit`` of the oldest unclaimed queued tasks (in the caller's transaction; ``last``:
    nothing follows it there, ``Store.all_last``)."""
    store.send_with_next("claim_settings")  # in the claim's round trip
    return store.all_last("claim_tasks", last, instance_id=instance_id, limit=limit)


def held_tasks(store: Store, instance_id: int) -> list[Row]:
    """Every unfinished task this instance holds, in id order (with run_by_shard and the key's token)."""
    return store.all("held_tasks", instance_id=instance_id)


def held_tasks_by_id(store: Store, instance_id: int, ids: list[int]) -> list[Row]:
    """Those of ``ids`` this instance still holds unfinished."""
    return store.all("held_tasks_by_id", instance_id=instance_id, ids=ids)


def release_unstarted(store: Store, instance_id: int) -> int:
    """Hand back the claimed tasks that never started (they keep their place); how many."""
    return store.run("release_unstarted", instance_id=instance_id)


def tasks_changes_since_analyze(store: Store) -> Row | None:
    """How many rows of tasks changed since its statistics were taken (changed) and how many it counts (estimated)."""
    return store.one("tasks_changes_since_analyze")


def analyze_tasks(store: Store) -> None:
    store.run("analyze_tasks")
