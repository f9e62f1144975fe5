"""Which partitions a multihost fetcher holds, under which tokens, and which it is handing over.

Pure bookkeeping, no I/O, so it is unit-tested without processes. A
partition is held under a lease (``partition_leases`` row, fencing token)
while the balancing gives it to this instance; a partition being handed over
(``releasing``) starts no more tasks and is freed once nothing of ours runs
in it. Per partition the book counts the claimed tasks in hand (routed to the
dispatcher and not ended), so the fetcher never takes a partition back while
copies of its tasks from an earlier lease are still in a shard's hands.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from taskomatic.model import TaskRow


class PartitionBook:
    def __init__(self, partitions: int) -> None:
        self.partitions = partitions  # P, as the database records it
        self.tokens: dict[int, int] = {}  # held partition -> token (releasing ones too)
        self.releasing: set[int] = set()
        self.in_hand: Counter[int] = Counter()  # partition -> claimed tasks routed and not ended
        self.task_partitions: dict[int, int] = {}  # task id -> partition, for tasks in hand

    def hold(self, partition: int, token: int, releasing: bool = False) -> None:
        """A lease acquired (or found at startup); a newer token replaces an older one."""
        if token >= self.tokens.get(partition, token):
            self.tokens[partition] = token
            if releasing:
                self.releasing.add(partition)
            else:
                self.releasing.discard(partition)

    def token_of(self, partition: int | None) -> int | None:
        return None if partition is None else self.tokens.get(partition)

    def claimable(self) -> dict[int, int]:
        """partition -> token of the held partitions whose tasks we claim (not being handed over)."""
        return {p: t for p, t in self.tokens.items() if p not in self.releasing}

    def held_count(self) -> int:
        return len(self.tokens)

    def begin_release(self, partitions: Iterable[int]) -> None:
        self.releasing.update(p for p in partitions if p in self.tokens)

    def releasing_leases(self) -> dict[int, int]:
        return {p: self.tokens[p] for p in sorted(self.releasing) if p in self.tokens}

    def released(self, partitions: Iterable[int]) -> None:
        """Freed in the database (handed over, or idle at a leave)."""
        for partition in partitions:
            self.tokens.pop(partition, None)
            self.releasing.discard(partition)

    def add(self, task: TaskRow) -> None:
        """A claimed task is now in hand (counted once, whatever copies come back)."""
        if task.partition is None or task.id in self.task_partitions:
            return
        self.task_partitions[task.id] = task.partition
        self.in_hand[task.partition] += 1

    def ended(self, task_id: int) -> None:
        """A task left our hands (ended, skipped, handed back, dropped)."""
        partition = self.task_partitions.pop(task_id, None)
        if partition is None:
            return
        self.in_hand[partition] -= 1
        if self.in_hand[partition] <= 0:
            del self.in_hand[partition]

    def busy(self, partition: int) -> bool:
        """Tasks of this partition are still in our hands (from an earlier lease, perhaps)."""
        return self.in_hand[partition] > 0 if partition in self.in_hand else False

    def per_partition(self, limit: int) -> int:
        """How many tasks a claim of ``limit`` may take from one partition: the claim reads at most held x this
        rows (about 2 x limit), and a batch spans many partitions, so many keys run side by side. (When only
        a few partitions have work, a claim takes fewer than ``limit``; the next turn of the loop claims more.)"""
        held = max(1, len(self.tokens) - len(self.releasing))
        return max(2, -(-2 * limit // held))
