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

# The id-order claim is used while an instance holds at least 1 / WINDOW_SHARE of the partitions:
# it then reads at most WINDOW_SHARE x the tasks it claims.
WINDOW_SHARE = 2


class PartitionBook:
    def __init__(self, partitions: int) -> None:
        self.partitions = partitions  # P, as the database records it
        self.tokens: dict[int, int] = {}  # held partition -> token (releasing ones too)
        self.releasing: set[int] = set()
        self.in_hand: Counter[int] = Counter()  # partition -> claimed tasks routed and not ended
        self.task_partitions: dict[int, int] = {}  # task id -> partition, for tasks in hand
        self.grown: dict[int, int] = {}  # partition -> a larger cap: its last claim took all it was allowed
        self.window_missed = False  # a full window gave us less than asked: per partition until a claim is short

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
            self.grown.pop(partition, None)

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

    def claim_caps(self, limit: int) -> dict[int, int]:
        """partition -> how many tasks a claim of ``limit`` may take from it: ``per_partition``, or more
        for a partition whose last claim was cut by its cap rather than by the batch's id order.

        A hot key lives in one partition; with a fixed cap of 2 (P = 256, one instance) a claim
        brought only two links of its chain, so the chain waited a claim per two tasks while
        standalone's claim, oldest first with no cap, brings its share of the batch (Zipf ran at
        half of standalone's tasks/s). Doubling on every cut claim gives the hot partition its
        share within a few claims, and the rows read stay bounded (see ``claimed``).
        """
        base = self.per_partition(limit)
        return {p: max(base, self.grown.get(p, 0)) for p in self.claimable()}

    def claim_window(self, limit: int) -> int:
        """How many unclaimed tasks an id-order claim (``claim_partition_window``) may read for ``limit`` of
        ours; 0: claim per partition (``claim_caps``) instead.

        While we hold at least 1 / WINDOW_SHARE of the partitions (one instance, or two), reading the queue
        in id order as standalone does costs less than one index descent per held partition: the window,
        limit x P / held rows, holds about ``limit`` of ours when the work is spread over the partitions.
        After a window that was full and gave us less than asked (others' tasks at the head of the queue),
        claims go per partition, which reads only ours, until one of them comes back short.
        """
        held = len(self.tokens) - sum(p in self.tokens for p in self.releasing)  # len(claimable()), not built
        if self.window_missed or held == 0 or held * WINDOW_SHARE < self.partitions:
            return 0
        return -(-limit * self.partitions // held)

    def window_claimed(self, taken: int, scanned: int, window: int, limit: int) -> bool:
        """An id-order claim took ``taken`` of ``limit`` from a window that held ``scanned`` unclaimed tasks;
        True if more may be waiting (claim again at once).

        A full window that gave less than ``limit`` (others' tasks at the head): the next claim, at once, goes
        per partition. A window that was not full read every unclaimed task: nothing more waits.
        """
        self.grown.clear()  # caps of per-partition claims long past; the next one starts from the base
        if taken >= limit:
            return True
        self.window_missed = scanned >= window
        return self.window_missed

    def claimed(self, caps: dict[int, int], taken: Counter[int], limit: int) -> bool:
        """A claim with these caps took ``taken`` per partition; True if some partition gave all it
        was allowed (it may have more: claim again at once).

        A partition that gave its whole cap had every offered task in the batch's id order, so the
        cap, not the order, held it back: its cap doubles (at most ``limit``); any other partition
        goes back to the base. The grown caps of one claim add up to at most 2 x ``limit``, so a
        claim reads at most about (held x base) + 2 x limit rows, whatever the skew.
        """
        if sum(taken.values()) < limit:
            self.window_missed = False  # our share of the queue's head is claimed: the window may serve again
        cut = False
        for partition, cap in caps.items():
            if taken[partition] >= cap:
                cut = True
                self.grown[partition] = min(max(limit, 2), 2 * cap)
            else:
                self.grown.pop(partition, None)
        return cut
