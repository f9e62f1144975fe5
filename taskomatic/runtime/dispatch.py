"""Which claimed task goes to which shard, and when: the fetcher's bookkeeping.

Pure logic, no I/O, so the order guarantees can be checked by property tests
without processes. Per slot it keeps ``backlog`` (claimed, not yet sent) and
``sent`` (sent, not yet ended, in id order). At most ``window`` tasks are sent
ahead, so a busy shard never makes the fetcher block on a full socket and a
drain hands back almost everything from here.

Every task of one ordering key goes to one slot (``router.shard_for``), and a
slot's shard runs what it is sent in order, one at a time: that is the whole
per-key order argument. When a shard is replaced, whatever its predecessor
was sent and did not end goes back to the *front* of the backlog, in id order,
so it keeps its place ahead of the key's later tasks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from taskomatic.runtime.messages import TaskRow
from taskomatic.runtime.router import OrderingKey, shard_for


def key_of(task: TaskRow) -> OrderingKey:
    return OrderingKey(task.key_type or task.target_type, task.key_id)


@dataclass
class SlotQueue:
    index: int
    backlog: deque[TaskRow] = field(default_factory=deque)
    # Sent and not ended. None: a task a shard reported holding after a
    # fetcher restart, which this fetcher never saw.
    sent: dict[int, TaskRow | None] = field(default_factory=dict)
    # Sent tasks the shard parked (retry backoff, waiting for children): they
    # do not count in the window, so a stuck key cannot starve the others.
    deferred: set[int] = field(default_factory=set)

    @property
    def held(self) -> int:
        return len(self.backlog) + len(self.sent)


class Dispatcher:
    def __init__(self, shards: int, window: int) -> None:
        self.window = window
        self.slots = [SlotQueue(i) for i in range(shards)]

    def route(self, task: TaskRow) -> int:
        """Append a claimed task to its key's slot; tasks must arrive in id order per key."""
        index = shard_for(key_of(task), len(self.slots))
        self.slots[index].backlog.append(task)
        return index

    def held(self) -> int:
        return sum(s.held for s in self.slots)

    def in_hand(self) -> set[int]:
        return {task_id for s in self.slots for task_id in s.sent} | {t.id for s in self.slots for t in s.backlog}

    def take_sendable(self, index: int) -> list[TaskRow]:
        """Move tasks from backlog to sent, up to the window; the caller sends them in this order."""
        slot = self.slots[index]
        out = []
        while slot.backlog and len(slot.sent) - len(slot.deferred) < self.window:
            task = slot.backlog.popleft()
            slot.sent[task.id] = task
            out.append(task)
        return out

    def unsend(self, index: int, tasks: list[TaskRow]) -> None:
        """Sending failed: put the tasks back at the front, in order."""
        slot = self.slots[index]
        for task in tasks:
            slot.sent.pop(task.id, None)
        slot.backlog.extendleft(reversed(tasks))

    def ended(self, index: int, task_id: int) -> None:
        self.slots[index].sent.pop(task_id, None)
        self.slots[index].deferred.discard(task_id)

    def defer(self, index: int, task_ids: tuple[int, ...]) -> None:
        slot = self.slots[index]
        slot.deferred.update(t for t in task_ids if t in slot.sent)

    def returned(self, index: int, task_ids: tuple[int, ...]) -> None:
        """A draining shard handed these back unstarted (the database releases them)."""
        for task_id in task_ids:
            self.ended(index, task_id)

    def shard_connected(self, index: int, held: set[int]) -> list[int]:
        """A shard (re)connected holding ``held``. Returns the ids the slot lost, removed from ``sent``.

        Lost: sent to (or reported by) an earlier shard of the slot and not held
        now. The caller reads their database state and hands the unfinished ones
        to ``requeue``. A held task that was also adopted into the backlog (a
        busy shard that reconnected late) is the shard's: its copy is dropped.
        """
        slot = self.slots[index]
        lost = [task_id for task_id in slot.sent if task_id not in held]
        for task_id in lost:
            del slot.sent[task_id]
            slot.deferred.discard(task_id)
        if any(t.id in held for t in slot.backlog):
            slot.backlog = deque(t for t in slot.backlog if t.id not in held)
        for task_id in sorted(held):
            slot.sent.setdefault(task_id, None)
        return lost

    def requeue(self, index: int, tasks: list[TaskRow]) -> None:
        """Put lost tasks back ahead of everything else of the slot, in id order."""
        self.slots[index].backlog.extendleft(reversed(sorted(tasks, key=lambda t: t.id)))
