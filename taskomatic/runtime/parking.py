"""Keys a shard has set aside: a transient failure waiting for its retry, or a
task waiting for the tasks it queued (clear_vms and its migrations).

A parked key's later tasks wait behind it, in order, while the shard goes on
with other keys; that is how "retry with backoff" keeps per-key order without
stalling the shard. Pure bookkeeping, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from taskomatic.model import OrderingKey, TaskRow, key_of

CHILDREN_POLL_SECONDS = 1.0


@dataclass
class ParkedKey:
    head: TaskRow  # state 'running' if it had started (it is reconciled when it wakes)
    wake_at: float
    reason: str
    waiting_for_children: bool = False
    behind: deque[TaskRow] = field(default_factory=deque)


class ParkingLot:
    def __init__(self, retry_limit: int, backoff_max: float) -> None:
        self.retry_limit = retry_limit
        self.backoff_max = backoff_max
        self.keys: dict[OrderingKey, ParkedKey] = {}
        self.failures: dict[int, int] = {}  # task id -> transient failures so far

    def is_parked(self, task: TaskRow) -> bool:
        return key_of(task) in self.keys

    def hold_behind(self, task: TaskRow) -> None:
        self.keys[key_of(task)].behind.append(task)

    def park_for_retry(self, task: TaskRow, reason: str, now: float) -> float | None:
        """Park ``task`` for a retry; the delay, or None when it has failed too often."""
        count = self.failures.get(task.id, 0) + 1
        self.failures[task.id] = count
        if count > self.retry_limit:
            return None
        delay = min(self.backoff_max, 2.0 ** (count - 1))
        self._park(task, now + delay, reason, waiting=False)
        return delay

    def park_for_children(self, task: TaskRow, reason: str, now: float) -> None:
        self._park(task, now + CHILDREN_POLL_SECONDS, reason, waiting=True)

    def _park(self, task: TaskRow, wake_at: float, reason: str, waiting: bool) -> None:
        key = key_of(task)
        earlier = self.keys.get(key)
        behind = earlier.behind if earlier is not None else deque()
        self.keys[key] = ParkedKey(task, wake_at, reason, waiting, behind)

    def due(self, now: float) -> list[ParkedKey]:
        """Parked keys whose time has come (still parked: ``unpark`` or ``snooze`` each)."""
        return [p for p in self.keys.values() if p.wake_at <= now]

    def unpark(self, parked: ParkedKey) -> list[TaskRow]:
        """Take a key out of the lot: its head (unless it ended) and the tasks behind, in order."""
        del self.keys[key_of(parked.head)]
        return [parked.head, *parked.behind]

    def snooze(self, parked: ParkedKey, now: float, seconds: float = CHILDREN_POLL_SECONDS) -> None:
        parked.wake_at = now + seconds

    def next_wake(self) -> float | None:
        return min((p.wake_at for p in self.keys.values()), default=None)

    def ended(self, task_id: int) -> None:
        self.failures.pop(task_id, None)

    def held_ids(self) -> list[int]:
        return [t.id for p in self.keys.values() for t in (p.head, *p.behind)]

    def release_all(self) -> list[TaskRow]:
        """Everything parked, heads first per key (drain hands these back)."""
        out = [t for p in self.keys.values() for t in (p.head, *p.behind)]
        self.keys.clear()
        return out
