"""What the metrics read from the database: the queue's size and age, how long a task waited."""

from __future__ import annotations

from dataclasses import dataclass

from taskomatic.db.store import Store


@dataclass(frozen=True)
class QueueSummary:
    queued: int
    running: int
    oldest_queued_seconds: float


def queue_summary(store: Store) -> QueueSummary:
    """Tasks queued and running now, and the age of the oldest queued one (0 when none)."""
    row = store.one("queue_summary")
    assert row is not None  # an aggregate always returns one row
    return QueueSummary(int(row["queued"]), int(row["running"]), float(row["oldest_queued_seconds"]))


