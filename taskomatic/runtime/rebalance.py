"""Multihost: one instance's balancing round over partition leases (docs/partitions.md).

Every renewal interval the fetcher reads who holds which partition
(``partition_view``) and which instances are live, computes the balanced
target (``partitions.balance``, the same answer on every instance), and acts
on its own part, each step usually empty:

1. acquire what is free or whose holder's lease ran out, adopting the tasks
   an earlier holder had claimed (running ones come back to be reconciled);
2. reserve what live holders must hand over to us (``request_partitions``);
3. begin handing over our surplus: no more starts there, our claimed
   unstarted tasks go back to the queue (and the dispatcher drops its copies);
4. free the partitions being handed over once nothing of ours runs in them.

Step 4 is also tried between rounds whenever a shard reports an end while a
hand-over is pending, so the taker waits for the last task, not for a timer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from taskomatic import metrics
from taskomatic.config import Config
from taskomatic.db import partitions as dbp
from taskomatic.db.store import Row, Store
from taskomatic.partitions import balance
from taskomatic.runtime.lease import limit_idle_transaction
from taskomatic.runtime.partition_book import PartitionBook

log = logging.getLogger(__name__)

# A hand-over pending: try to finish it at most this often while tasks end.
RELEASE_RETRY = 0.05
# While we wait for partitions a live holder is handing over, look again this often
# (a fraction of the renewal interval), so a joining instance starts soon.
WAITING_SHARE = 0.25


class Rebalancer:
    def __init__(self, store: Store, config: Callable[[], Config], instance_id: int, book: PartitionBook,
                 adopted: Callable[[list[Row]], None], dropped: Callable[[set[int]], None]) -> None:
        self.store = store
        self.config = config  # the fetcher's current configuration (it reloads on SIGHUP)
        self.instance_id = instance_id
        self.book = book
        self.adopted = adopted  # routes tasks adopted with acquired partitions
        self.dropped = dropped  # the dispatcher forgets queued tasks of partitions being handed over
        self.next_round = 0.0
        self.next_release_try = 0.0
        self.tasks_ended = False  # a shard reported ends since the last try to finish a hand-over
        self.waiting_for: tuple[int, ...] = ()  # reserved from live holders, not yet ours

    def due(self, now: float) -> bool:
        return now >= self.next_round

    def announced(self, sender: str) -> None:
        """Another instance reserved or freed partitions (a notification): balance again now."""
        if sender != str(self.instance_id):
            self.next_round = 0.0

    def release_pending(self) -> bool:
        """A hand-over waits, and tasks ended since we last tried to finish it."""
        return bool(self.book.releasing) and self.tasks_ended

    def release_due(self, now: float) -> bool:
        return self.release_pending() and now >= self.next_release_try

    def round(self, now: float) -> bool:
        """One balancing round; True if it acquired partitions (a claim is worth trying at once)."""
        interval = self.config().lease_renew_interval
        self.next_round = now + interval
        with self.store.transaction():
            view = dbp.partition_view(self.store)
            live = dbp.live_multihost_instances(self.store)
        # A holder whose lease ran out counts as no holder: its partitions are taken over.
        live_set = set(live)
        owners = {lease.partition: lease.instance_id for lease in view if lease.instance_id in live_set}
        if self.instance_id not in live_set:
            return False  # our lease ran out: the lease keeper ends this fetcher; act on nothing meanwhile
        plan = balance(self.instance_id, live, owners, self.book.partitions)
        # Copies of an earlier lease's tasks still in our hands: take the partition back once they are gone.
        wanted = [p for p in plan.acquire if not self.book.busy(p)]
        free_or_dead = [p for p in wanted if owners.get(p) is None]
        from_live = [p for p in wanted if owners.get(p) is not None]
        surplus = {p: t for p, t in self.book.tokens.items() if p in plan.release and p not in self.book.releasing}
        with self.store.transaction():
            limit_idle_transaction(self.store, self.config())
            acquired = dbp.acquire_partitions(self.store, self.instance_id, free_or_dead) if free_or_dead else []
            rows = dbp.adopt_partition_tasks(self.store, self.instance_id, [a.partition for a in acquired])
            reserved = dbp.request_partitions(self.store, self.instance_id, from_live)
            began = dbp.begin_release(self.store, self.instance_id, surplus) if surplus else None
            if reserved.made:
                dbp.announce_partition_moves(self.store, self.instance_id)  # the holders begin handing over now
        for lease in acquired:
            self.book.hold(lease.partition, lease.token)
        if acquired:
            taken = [a for a in acquired if a.previous is not None]
            log.info("acquired %d partitions (%d taken over from instances %s whose lease ran out; %d tasks "
                     "adopted)", len(acquired), len(taken),
                     ", ".join(str(i) for i in sorted({a.previous for a in taken if a.previous})) or "-", len(rows))
            metrics.partitions_taken(len(acquired))
            self.adopted(rows)
        if began is not None and began.partitions:
            self.book.begin_release(began.partitions)
            self.dropped(set(began.partitions))
            log.info("handing over %d partitions (%d claimed tasks back to the queue)", len(began.partitions),
                     began.unclaimed)
        self.finish_releases(now)
        metrics.rebalanced()
        self.waiting_for = tuple(from_live)
        if self.waiting_for:
            self.next_round = now + interval * WAITING_SHARE
        return bool(acquired)

    def finish_releases(self, now: float) -> None:
        """Free the partitions being handed over once nothing of ours runs in them."""
        self.next_release_try = now + RELEASE_RETRY
        self.tasks_ended = False
        pending = self.book.releasing_leases()
        if not pending:
            return
        with self.store.transaction():
            limit_idle_transaction(self.store, self.config())
            freed = dbp.release_partitions(self.store, self.instance_id, pending)
            if freed.partitions:
                dbp.announce_partition_moves(self.store, self.instance_id)  # the takers acquire them now
        if freed.partitions:
            self.book.released(freed.partitions)
            log.info("handed over %d partitions", len(freed.partitions))
            metrics.partitions_given(len(freed.partitions))
