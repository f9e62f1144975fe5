"""A task's writes as it runs: marked running, ended, failed before it started, its children.

Every write checks the holder (``claimed_by``): only the instance that holds a
task marks or ends it, and only once. Queries: ``sql/task_writes.sql``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskomatic.db.store import Row, Store


def task_states(store: Store, ids: list[int]) -> list[Row]:
    """Current state, holder (claimed_by) and running slot (run_by_shard) of these tasks."""
    return store.all("task_states", ids=ids)


def mark_running(store: Store, instance_id: int, task_ids: list[int], time_started: datetime,
                 shard: int, last: bool = False) -> dict[int, datetime]:
    """Mark these queued tasks running: id -> when it was submitted (created_at), for each marked
    (canceled, ended or taken ones are not). ``last``: nothing follows it in the transaction."""
    rows = store.all_last("mark_running", last, task_ids=task_ids, instance_id=instance_id,
                          time_started=time_started, shard=shard)
    return {r["id"]: r["created_at"] for r in rows}


def mark_rerun(store: Store, instance_id: int, task_id: int, time_started: datetime, shard: int) -> bool:
    """A running task found "not started" runs again in its place; False if it is no longer ours."""
    return store.one("mark_rerun", task_id=task_id, instance_id=instance_id, time_started=time_started,
                     shard=shard) is not None


def record_outcomes(store: Store, instance_id: int, task_ids: Sequence[int], states: Sequence[str],
                    messages: Sequence[str | None], starts: Sequence[datetime | None],
                    ends: Sequence[datetime], last: bool = False) -> set[int]:
    """Write these tasks' ends (parallel sequences; a None start keeps the one marked); the ids written.
    ``last``: nothing follows it in the transaction (``Store.all_last``)."""
    rows = store.all_last("record_outcomes", last, instance_id=instance_id, task_ids=list(task_ids),
                          states=list(states), messages=list(messages), starts=list(starts), ends=list(ends))
    return {r["id"] for r in rows}


@dataclass(frozen=True)
class Ends:
    """Task ends to write (parallel sequences; a None start keeps the one marked)."""

    task_ids: Sequence[int]
    states: Sequence[str]
    messages: Sequence[str | None]
    starts: Sequence[datetime | None]
    ends: Sequence[datetime]

    def params(self) -> dict[str, list[Any]]:
        return {"end_ids": list(self.task_ids), "states": list(self.states), "messages": list(self.messages),
                "starts": list(self.starts), "ends": list(self.ends)}


def end_and_start(store: Store, instance_id: int, ends: Ends, task_ids: list[int], time_started: datetime,
                  shard: int, last: bool) -> tuple[set[int], dict[int, datetime]]:
    """``record_outcomes`` and ``mark_running`` in one statement: the ids written, and id -> created_at of
    each started. ``last``: nothing follows it in the transaction (alone in it, it commits:
    ``Store.all_last``)."""
    rows = store.all_last("end_and_start", last, instance_id=instance_id, start_ids=task_ids,
                          time_started=time_started, shard=shard, **ends.params())
    return split_ends_and_starts(rows)


def split_ends_and_starts(rows: list[Row]) -> tuple[set[int], dict[int, datetime]]:
    """The rows of end_and_start(_fenced): (ids written, id -> created_at of each started)."""
    return ({r["id"] for r in rows if not r["started"]},
            {r["id"]: r["created_at"] for r in rows if r["started"]})


def record_outcome(store: Store, instance_id: int, task_id: int, state: str, message: str | None,
                   time_started: datetime | None, time_ended: datetime) -> bool:
    """Write one task's end (the same rule as ``record_outcomes``); False if it is not ours to end."""
    return store.one("record_outcome", instance_id=instance_id, task_id=task_id, state=state, message=message,
                     time_started=time_started, time_ended=time_ended) is not None


def fail_unstartable(store: Store, instance_id: int, task_id: int, message: str, moment: datetime) -> bool:
    """A task we hold fails before it starts; False if it is not ours (any more)."""
    return store.one("fail_unstartable", task_id=task_id, instance_id=instance_id, message=message,
                     time=moment) is not None


def children_of(store: Store, task_id: int) -> list[Row]:
    """The tasks a task queued (clear_vms's migrations), in id order."""
    return store.all("children_of", task_id=task_id)


def insert_child_task(store: Store, parent_task_id: int, target_type: str, target_id: int, action: str,
                      args: str, submitted_by: str) -> int:
    """Queue a task on behalf of another (``args``: JSON text); its id."""
    return int(store.scalar("insert_child_task", target_type=target_type, target_id=target_id, action=action,
                            args=args, submitted_by=submitted_by, parent_task_id=parent_task_id))


def task_claim(store: Store, task_id: int) -> Row | None:
    """Who holds a task and how many times it was started (claimed_by, attempts)."""
    return store.one("task_claim", task_id=task_id)


def hold_running_task(store: Store, task_id: int, claimed_by: Any, attempts: Any) -> bool:
    """Lock the task if it still runs under this claim and start; False if it does not."""
    return store.one("hold_running_task", task_id=task_id, claimed_by=claimed_by, attempts=attempts) is not None
