"""The multihost fetcher's partition bookkeeping: the book, the dispatcher's hand-over drop, the balancing round.

Pure logic; the balancing round runs against a stand-in for the partition
queries (the real SQL is tested in tests/property/test_partition_protocol.py
and tests/integration/test_partitions_sql.py, the whole in the multihost
acceptance tests).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from taskomatic.db import partitions as dbp
from taskomatic.model import OrderingKey, TaskRow
from taskomatic.runtime import rebalance
from taskomatic.runtime.dispatch import Dispatcher
from taskomatic.runtime.partition_book import PartitionBook
from taskomatic.runtime.rebalance import Rebalancer

P = 8


def task(task_id: int, vm: int, partition: int | None = None, token: int | None = 1) -> TaskRow:
    return TaskRow(task_id, "Vm", vm, "start_vm", {}, "Vm", vm, "queued", token,
                   partition=vm % P if partition is None else partition)


# -- the book ---------------------------------------------------------------------------------


def test_a_newer_token_replaces_an_older_one_never_the_reverse() -> None:
    book = PartitionBook(P)
    book.hold(3, 10)
    book.hold(3, 7)
    assert book.token_of(3) == 10
    book.hold(3, 12)
    assert book.token_of(3) == 12 and book.token_of(4) is None and book.token_of(None) is None


def test_partitions_being_handed_over_are_not_claimed_from_and_go_once_released() -> None:
    book = PartitionBook(P)
    for p in range(4):
        book.hold(p, 100 + p)
    book.begin_release([1, 2, 6])  # 6 is not ours: ignored
    assert book.claimable() == {0: 100, 3: 103}
    assert book.releasing_leases() == {1: 101, 2: 102}
    book.released([1])
    assert book.held_count() == 3 and book.releasing_leases() == {2: 102}
    book.hold(5, 1, releasing=True)  # found releasing at a fetcher's restart
    assert 5 in book.releasing and 5 not in book.claimable()


def test_tasks_in_hand_are_counted_once_per_partition() -> None:
    book = PartitionBook(P)
    book.add(task(1, vm=2))
    book.add(task(1, vm=2))  # a copy sent again after a restart
    book.add(task(2, vm=2))
    book.add(TaskRow(3, "Vm", 4, "start_vm", {}, "Vm", 4, "queued"))  # standalone row: no partition
    assert book.busy(2) and not book.busy(4)
    book.ended(1)
    assert book.busy(2)
    book.ended(2)
    book.ended(99)  # unknown: ignored
    assert not book.busy(2) and book.in_hand == {}


def test_a_claim_takes_a_bounded_share_of_each_partition() -> None:
    book = PartitionBook(P)
    for p in range(P):
        book.hold(p, 1)
    assert book.per_partition(200) == -(-400 // P)  # about 2 x limit rows read in all
    assert book.per_partition(1) == 2  # never fewer than 2: a key's next task comes with it
    book.begin_release(range(P - 2, P))
    assert book.per_partition(200) == -(-400 // (P - 2))  # counted over the partitions it claims from
    few = PartitionBook(P)
    few.hold(3, 1)
    assert few.per_partition(200) == 400  # one partition: the whole batch may come from it




def test_a_partition_cut_by_its_cap_gets_a_larger_cap_and_the_rest_keep_the_base() -> None:
    many = 256  # as deployed: the base cap is 2
    book = PartitionBook(many)
    for p in range(many):
        book.hold(p, 1)
    base = book.per_partition(200)
    caps = book.claim_caps(200)
    assert base == 2 and set(caps) == set(range(many)) and set(caps.values()) == {base}
    # Partition 7 gave all it was allowed; 8 gave less (the batch's id order cut it, not its cap).
    assert book.claimed(caps, Counter({7: base, 8: base - 1}), 200)
    caps = book.claim_caps(200)
    assert caps[7] == 2 * base and caps[8] == base
    for _ in range(12):  # a hot key's partition keeps being cut: its cap grows to the whole batch
        caps = book.claim_caps(200)
        book.claimed(caps, Counter({7: caps[7]}), 200)
    assert book.claim_caps(200)[7] == 200
    assert not book.claimed(book.claim_caps(200), Counter({7: 3}), 200)  # no longer cut: back to the base
    assert book.claim_caps(200)[7] == base
    book.claimed(book.claim_caps(200), Counter({7: base}), 200)
    book.begin_release([7])
    assert 7 not in book.claim_caps(200)  # releasing: not claimed from
    book.released([7])
    book.hold(7, 2)
    assert book.claim_caps(200)[7] == base  # a new lease starts from the base


def test_the_id_order_claim_is_used_while_half_the_partitions_or_more_are_held() -> None:
    many = 256
    book = PartitionBook(many)
    assert book.claim_window(200) == 0  # nothing held
    for p in range(many):
        book.hold(p, 1)
    assert book.claim_window(200) == 200  # all of them: the window is the batch, as standalone reads
    book.begin_release(range(many // 2, many))  # half being handed over: claimed from half
    assert book.claim_window(200) == 400  # the window doubles to hold about 200 of ours
    book.begin_release([0])  # fewer than half: one descent per held partition instead
    assert book.claim_window(200) == 0
    few = PartitionBook(many)
    for p in range(0, many, 3):  # a third, as one of three instances
        few.hold(p, 1)
    assert few.claim_window(200) == 0


def test_a_full_window_that_gave_less_than_asked_sends_claims_per_partition_until_one_comes_back_short() -> None:
    book = PartitionBook(P)
    for p in range(P):
        book.hold(p, 1)
    window = book.claim_window(200)
    assert book.window_claimed(200, window, window, 200)  # a full batch: more may wait, claim again
    assert book.claim_window(200) == window
    # Others' tasks fill the head (a full window gave 50, or none): the next claim, at once, per partition.
    for taken in (50, 0):
        assert book.window_claimed(taken, window, window, 200)
        assert book.claim_window(200) == 0
        caps = book.claim_caps(200)
        book.claimed(caps, Counter({p: 25 for p in range(P)}), 200)  # a whole batch of ours: still per partition
        assert book.claim_window(200) == 0
        book.claimed(book.claim_caps(200), Counter({0: 1}), 200)  # short: ours at the head are claimed
        assert book.claim_window(200) == window  # the window again
    # The window was not full: every unclaimed task was read, nothing more waits, and none of ours.
    assert not book.window_claimed(50, window - 1, window, 200)
    assert not book.window_claimed(0, 0, window, 200)
    assert book.claim_window(200) == window


def test_a_window_claim_drops_the_grown_caps_of_earlier_per_partition_claims() -> None:
    book = PartitionBook(P)
    for p in range(P):
        book.hold(p, 1)
    base = book.per_partition(200)
    book.claimed(book.claim_caps(200), Counter({3: base}), 200)
    assert book.claim_caps(200)[3] == 2 * base
    book.window_claimed(10, 10, book.claim_window(200), 200)
    assert book.claim_caps(200)[3] == base


def test_grown_caps_stay_bounded_whatever_the_claims_took() -> None:
    """A claim of limit rows can grow caps to at most 2 x limit in all, so the rows a claim reads
    stay near held x base + 2 x limit, whatever the skew."""
    import random

    rng = random.Random(5)
    many = 256
    book = PartitionBook(many)
    for p in range(many):
        book.hold(p, 1)
    base = book.per_partition(200)
    for _ in range(500):
        caps = book.claim_caps(200)
        taken: Counter[int] = Counter()
        left = 200
        for p in rng.sample(range(many), many):  # any split of the batch that respects the caps
            n = min(caps[p], left, rng.choice((0, caps[p], caps[p])))
            taken[p], left = n, left - n
        book.claimed(caps, taken, 200)
        assert sum(book.claim_caps(200).values()) <= base * many + 2 * 200


# -- the dispatcher drops a partition's waiting tasks ------------------------------------------


def test_drop_partitions_forgets_waiting_tasks_and_keeps_what_was_sent() -> None:
    d = Dispatcher(1, per_key_ahead=1)
    d.route(task(1, vm=1))
    d.route(task(2, vm=1))  # waits behind 1 (one of a key in flight)
    d.route(task(3, vm=2))
    d.route(task(4, vm=3))
    sent = d.take_sendable(0)
    assert [t.id for t in sent] == [1]
    dropped = d.drop_partitions({1, 2})
    assert sorted(dropped) == [2, 3]
    assert d.held() == 2 and list(d.slots[0].sent) == [1]
    assert OrderingKey("Vm", 1) not in d.waiting and OrderingKey("Vm", 2) not in d.waiting
    d.ended(0, 1)
    assert [t.id for t in d.take_sendable(0)] == [4]  # the other partition goes on
    assert d.held() == 1


# -- the balancing round --------------------------------------------------------------------------


class FakeStore:
    @contextmanager
    def transaction(self) -> Any:
        yield self

    def rollback(self) -> None:
        pass


@pytest.fixture
def db(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The partition queries, answered from a table of holders; calls recorded."""
    state = SimpleNamespace(owners={}, live=[1], calls=[], freed=set())

    def view(store: Any) -> list[dbp.PartitionLease]:
        return [dbp.PartitionLease(p, state.owners.get(p), 1, False, None, state.owners.get(p) in state.live)
                for p in range(P)]

    def acquire(store: Any, me: int, partitions: list[int]) -> list[dbp.Acquired]:
        state.calls.append(("acquire", sorted(partitions)))
        return [dbp.Acquired(p, 50 + p, state.owners.get(p)) for p in partitions]

    def adopt(store: Any, me: int, partitions: list[int]) -> list[dict]:
        return []

    def request(store: Any, me: int, partitions: list[int]) -> dbp.Reservations:
        state.calls.append(("request", sorted(partitions)))
        return dbp.Reservations(tuple(partitions), ())

    def begin(store: Any, me: int, held: dict[int, int]) -> dbp.Released:
        state.calls.append(("begin_release", dict(held)))
        return dbp.Released(tuple(sorted(held)), 0)

    def release(store: Any, me: int, held: dict[int, int]) -> dbp.Released:
        state.calls.append(("release", dict(held)))
        return dbp.Released(tuple(sorted(p for p in held if p in state.freed)), 0)

    def announce(store: Any, me: int) -> None:
        state.calls.append(("announce", me))

    fake = SimpleNamespace(partition_view=view, live_multihost_instances=lambda store: list(state.live),
                           acquire_partitions=acquire, adopt_partition_tasks=adopt, request_partitions=request,
                           begin_release=begin, release_partitions=release, announce_partition_moves=announce)
    monkeypatch.setattr(rebalance, "dbp", fake)
    monkeypatch.setattr(rebalance, "limit_idle_transaction", lambda store, config: None)
    return state


def make(book: PartitionBook, dropped: list[set[int]]) -> Rebalancer:
    config = SimpleNamespace(lease_renew_interval=2.0, mode="multihost", lease_seconds=6.0)
    return Rebalancer(FakeStore(), lambda: config, 1, book, lambda rows: None, dropped.append)  # type: ignore[arg-type]


def test_a_lone_instance_acquires_every_free_partition(db: SimpleNamespace) -> None:
    book = PartitionBook(P)
    assert make(book, []).round(0.0)
    assert ("acquire", list(range(P))) in db.calls
    assert book.claimable() == {p: 50 + p for p in range(P)}


def test_a_joiner_makes_the_holder_hand_over_its_surplus(db: SimpleNamespace) -> None:
    book = PartitionBook(P)
    for p in range(P):
        book.hold(p, 1)
    db.owners = dict.fromkeys(range(P), 1)
    db.live = [1, 2]
    dropped: list[set[int]] = []
    rounds = make(book, dropped)
    assert not rounds.round(0.0)
    assert ("begin_release", {p: 1 for p in range(4, 8)}) in db.calls  # keeps its lowest-numbered half
    assert dropped == [{4, 5, 6, 7}] and book.claimable() == {p: 1 for p in range(4)}
    assert rounds.next_round == 2.0
    # Nothing of ours runs in 4 and 5 any more: they go; 6 and 7 wait for their last tasks.
    assert ("announce", 1) not in db.calls  # nothing freed yet
    db.freed = {4, 5}
    rounds.finish_releases(0.5)
    assert ("announce", 1) in db.calls
    assert book.releasing_leases() == {6: 1, 7: 1} and book.held_count() == 6
    assert not rounds.release_due(0.6)  # no task ended since: nothing to try
    rounds.tasks_ended = True
    assert not rounds.release_due(0.52) and rounds.release_due(0.6)


def test_the_joiner_reserves_its_share_and_looks_again_soon(db: SimpleNamespace) -> None:
    book = PartitionBook(P)
    db.owners = dict.fromkeys(range(P), 2)
    db.live = [1, 2]
    rounds = make(book, [])
    assert not rounds.round(0.0)
    assert ("request", [4, 5, 6, 7]) in db.calls and not any(c[0] == "acquire" for c in db.calls)
    assert ("announce", 1) in db.calls  # the holder hears of it at once
    assert rounds.next_round == pytest.approx(2.0 * rebalance.WAITING_SHARE)
    rounds.announced("1")  # our own notification: nothing
    assert not rounds.due(0.1)
    rounds.announced("2")  # the holder freed some: look now
    assert rounds.due(0.1)


def test_a_partition_with_tasks_still_in_hand_is_not_taken_back(db: SimpleNamespace) -> None:
    book = PartitionBook(P)
    book.add(task(1, vm=3, partition=3))  # a copy from an earlier lease of ours, not ended yet
    make(book, []).round(0.0)
    assert ("acquire", [0, 1, 2, 4, 5, 6, 7]) in db.calls


def test_an_instance_whose_lease_ran_out_acts_on_nothing(db: SimpleNamespace) -> None:
    book = PartitionBook(P)
    book.hold(0, 1)
    db.live = [2]
    rounds = make(book, [])
    assert not rounds.round(0.0)
    assert db.calls == [] and book.claimable() == {0: 1}
    assert not rounds.due(1.0) and rounds.due(2.0)  # and it does not ask again at once
