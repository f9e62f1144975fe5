"""The task model every part shares: a claimed task, its ordering key, and the names of states.

This is a public module: actions (built-in and plugins) import ``TaskRow``
from here, never from the runtime's internal modules. The enums are
``StrEnum``, so their values are the very strings the database and the
``tasks`` table's public contract use (``TaskState.FAILED == "failed"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple


class TaskState(StrEnum):
    """``tasks.state``: queued -> running -> finished / failed; queued -> canceled."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL_STATES = frozenset({TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELED})


class OutcomeState(StrEnum):
    """What an action's ``perform`` ended in."""

    FINISHED = "finished"
    FAILED = "failed"
    # Not an end: the task stays running until the tasks it queued (children) have all ended.
    WAITING = "waiting"


class Settlement(StrEnum):
    """What reconciling a task an earlier process left ``running`` found."""

    DONE = "done"  # it took effect: finished
    NOT_STARTED = "not_started"  # it did not: run it again in its place
    NEITHER = "neither"  # half done: failed, with what was found
    # The task had queued children that are still running: wait for them.
    WAITING = "waiting"


class EndState(StrEnum):
    """How a task left a shard's hands (the shard tells the fetcher)."""

    FINISHED = "finished"
    FAILED = "failed"
    SKIPPED = "skipped"  # not ours to run after all (ended elsewhere, claim lost, fenced)


@dataclass(frozen=True)
class TaskRow:
    """A claimed task as the fetcher read it; the shard re-checks it when it starts."""

    id: int
    target_type: str
    target_id: int | None
    action: str
    args: Any
    key_type: str | None
    key_id: int | None
    # 'queued': run it. 'running': it was interrupted, reconcile first.
    state: str
    # Multihost: the fencing token of the partition lease it was claimed under;
    # every write for it checks the lease still holds that token. None in standalone.
    token: int | None = None
    # The key's partition (the database's tasks.partition), when the row said.
    partition: int | None = None


class OrderingKey(NamedTuple):
    """What serialises tasks: ('Vm', 12), ('StoragePool', 2), ('Host', 3).

    A named tuple, not a dataclass: the fetcher's dispatcher hashes and
    compares keys about 25 times per task (its dict and set lookups), and a
    tuple does both in C, where a dataclass runs generated Python for each.
    """

    kind: str
    ident: int | None

    def __str__(self) -> str:
        return f"{self.kind}:{self.ident}"


def key_of(task: TaskRow) -> OrderingKey:
    """The task's ordering key (the database sets ``key_type``; the target type stands in if it did not)."""
    return OrderingKey(task.key_type or task.target_type, task.key_id)


def task_from_row(row: dict[str, Any], token: int | None = None) -> TaskRow:
    """A TaskRow from a tasks row (a claim's token overrides the row's)."""
    return TaskRow(
        id=row["id"], target_type=row["task_target_type"], target_id=row["task_target_id"],
        action=row["action"], args=row["args"], key_type=row["key_type"], key_id=row["key_id"],
        state=row["state"], token=row.get("token") if token is None else token, partition=row.get("partition"),
    )
