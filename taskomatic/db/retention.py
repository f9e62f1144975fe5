"""Retention of ended tasks: move them to tasks_archive (or delete them), prune the archive.

Each batch function runs one named query of ``sql/retention.sql`` in the
caller's transaction; :mod:`taskomatic.retention` decides when and how many.
Ages are seconds, compared with the database's clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskomatic.db.store import Row, Store

# Arbitrary constant shared by every taskomatic process: "retention is running".
RETENTION_LOCK_ID = 0x7A5C0004  # the others: migrate (1), instance guard (2), placement (3)


def try_lock(store: Store) -> bool:
    """Take the retention lock for this transaction; False if another session holds it."""
    row = store.one("retention_lock", lock_id=RETENTION_LOCK_ID)
    return bool(row and row["locked"])


def wait_lock(store: Store) -> None:
    """Take the retention lock for this transaction, waiting while another session holds it."""
    store.one("retention_lock_wait", lock_id=RETENTION_LOCK_ID)


def archive_ended(store: Store, keep_s: float, batch: int) -> int:
    """Move up to ``batch`` tasks ended more than ``keep_s`` seconds ago to tasks_archive; how many."""
    return int(store.scalar("archive_ended_tasks", keep_s=keep_s, batch=batch))


def prune_ended(store: Store, keep_s: float, batch: int) -> int:
    """Delete up to ``batch`` tasks ended more than ``keep_s`` seconds ago; how many."""
    return int(store.scalar("prune_ended_tasks", keep_s=keep_s, batch=batch))


def prune_archive(store: Store, keep_s: float, batch: int) -> int:
    """Delete up to ``batch`` archived tasks ended more than ``keep_s`` seconds ago; how many."""
    return int(store.scalar("prune_archive", keep_s=keep_s, batch=batch))


def count_ended(store: Store, keep_s: float) -> Row:
    """What a pass would take out of tasks now: eligible, oldest_end."""
    return store.one("count_ended_tasks", keep_s=keep_s) or {"eligible": 0, "oldest_end": None}


def count_held_back_parents(store: Store, keep_s: float) -> int:
    """Ended tasks old enough to go, kept because a task they queued is still in tasks."""
    return int(store.scalar("count_held_back_parents", keep_s=keep_s))


def count_archive_expired(store: Store, keep_s: float) -> Row:
    """What a pass would delete from tasks_archive now: eligible, oldest_end."""
    return store.one("count_archive_expired", keep_s=keep_s) or {"eligible": 0, "oldest_end": None}


def list_archived(store: Store, state: str | None, target_type: str | None, target_id: int | None,
                  action: str | None, limit: int) -> list[Row]:
    """Archived tasks, newest first (the columns ``operator.list_tasks`` gives)."""
    return store.all("list_archived_tasks", state=state, target_type=target_type, target_id=target_id,
                     action=action, limit=limit)


def archived_task_details(store: Store, task_id: int) -> Row | None:
    """One archived task whole, or None."""
    return store.one("archived_task_details", task_id=task_id)
