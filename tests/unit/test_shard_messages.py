"""Messages between a shard and the fetcher: what a batch's start sends, in how many writes, and how they are read.

A batch's start commits the outcomes held from the previous batch and marks
the new one running; what it ended and what it started go to the fetcher in
one write (``Several``), so a slow task sends the fetcher two messages
(start, performed) instead of four, and one when the shard has a lookahead
of work (a slow successor) queued already (no ``Performed``). Real sockets, no database: the execution
runs on the fake store of ``shard_fakes``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from multiprocess.connection import Connection

from taskomatic.actions.base import Outcome
from taskomatic.config import Config
from taskomatic.runtime import channel as wire
from taskomatic.runtime.dispatch import LOOKAHEAD, Dispatcher
from taskomatic.runtime.execution import WORK_SCAN
from taskomatic.runtime.execution import ShardLink as ExecutionLink
from taskomatic.runtime.fetcher import Fetcher, ShardLink
from taskomatic.runtime.messages import Ended, Performed, Several, Started, TaskEnd
from taskomatic.runtime.outcomes import PendingOutcome, now
from taskomatic.runtime.partition_book import PartitionBook
from taskomatic.runtime.readiness import Readiness, readable_now
from taskomatic.runtime.shard import Shard
from tests.unit.shard_fakes import make_rig, task


@pytest.fixture
def pair() -> Iterator[tuple[Connection, Connection]]:
    a, b = socket.socketpair()
    left, right = Connection(a.detach()), Connection(b.detach())
    yield left, right
    for end in (left, right):
        if not end.closed:
            end.close()


# -- readiness ------------------------------------------------------------------------


def test_readiness_reports_only_the_channels_with_something_to_read(pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    c, d = socket.socketpair()
    other, other_peer = Connection(c.detach()), Connection(d.detach())
    try:
        readiness = Readiness()
        assert readiness.wait([right, other], 0) == []
        wire.send(left, "hello")
        assert readiness.wait([right, other], 0) == [right]
        assert readable_now(right) and not readable_now(other)
        assert wire.recv(right) == "hello"
        assert readiness.wait([right, other], 0) == []
        other_peer.close()  # an end of file is something to read: the reader learns the peer is gone
        assert readiness.wait([right, other], 0) == [other] and readable_now(other)
    finally:
        other.close()


def test_readiness_forgets_a_channel_dropped_from_its_list(pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    c, d = socket.socketpair()
    gone, gone_peer = Connection(c.detach()), Connection(d.detach())
    readiness = Readiness()
    assert readiness.wait([right, gone], 0) == []
    gone_peer.close()
    gone.close()  # its owner closes it and stops listing it
    wire.send(left, 1)
    assert readiness.wait([right], 0) == [right]  # polled again without the closed descriptor


# -- a shard's writes -----------------------------------------------------------------


def _shard_on(channel: Connection) -> Shard:
    shard = object.__new__(Shard)  # no database, no fetcher socket: only the channel
    shard.channel = channel
    shard.outbox = None
    return shard


def test_messages_sent_together_arrive_as_one_in_their_order(pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    shard = _shard_on(left)
    ended, started = Ended((TaskEnd(1, "finished"),)), Started((2,))
    with shard._together():
        shard._send(ended)
        with shard._together():  # nested: still one write, at the outermost end
            shard._send(started)
        assert not readable_now(right)
    assert wire.recv(right) == Several((ended, started))
    assert not readable_now(right)
    with shard._together():
        shard._send(started)
    assert wire.recv(right) == started  # one message goes as itself
    with shard._together():
        pass
    assert not readable_now(right)  # nothing to say: nothing written


def test_messages_held_are_sent_when_the_block_fails(pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    shard = _shard_on(left)
    ended = Ended((TaskEnd(1, "finished"),))
    with pytest.raises(RuntimeError), shard._together():
        shard._send(ended)  # committed before the failure: the fetcher must still learn it
        raise RuntimeError("connection lost")
    assert wire.recv(right) == ended


# -- what a batch's start sends ------------------------------------------------------------


def test_a_start_sends_what_its_commit_ended_and_what_it_started_together() -> None:
    rig = make_rig(quick=True)

    @contextmanager
    def together() -> Iterator[None]:
        rig.sent.append("open")
        yield
        rig.sent.append("close")

    rig.execution.link = ExecutionLink(rig.sent.append, lambda: False, lambda: True, together)
    tasks = [task(1, vm=10), task(2, vm=10)]  # one key: the second's start commits the first's outcome
    for t in tasks:
        rig.store.add_task(t)
    rig.run_queue(list(tasks))
    blocks = [m if isinstance(m, str) else type(m).__name__ if not isinstance(m, tuple) else m[0] for m in rig.sent]
    assert blocks == ["open", "Started", "close", "Performed",
                      "open", "ended", "Started", "close", "Performed",
                      "ended"]  # the last outcome, committed falling idle
    assert ("ended", ()) not in rig.sent  # a start that ended nothing says nothing of it


def _kinds(sent: list[object]) -> list[str]:
    return [type(m).__name__ if not isinstance(m, tuple) else m[0] for m in sent]


def test_a_shard_with_a_lookahead_of_work_queued_does_not_say_performed() -> None:
    rig = make_rig(quick=False)
    rig.execution.estimates["touch"] = 0.02  # slow: one queued is more than the fetcher's lookahead
    tasks = [task(1, vm=10), task(2, vm=10), task(3, vm=11)]
    for t in tasks:
        rig.store.add_task(t)
    rig.run_queue(list(tasks))
    # Task 2 was queued when task 1 ran, task 3 when task 2 ran: their starts say Ended soon enough.
    # Task 3 ran with nothing queued: the fetcher is told, so it may send the next task at once.
    assert _kinds(rig.sent) == ["Started", "ended", "Started", "ended", "Started", "Performed", "ended"]


def test_a_shard_with_less_than_a_lookahead_queued_says_performed() -> None:
    rig = make_rig(quick=False)
    rig.execution.estimates["touch"] = 0.02
    rig.execution.estimates["tick"] = 0.0001  # quick: queued behind the slow task, the slot still has room
    slow, quick = task(1, vm=10), task(2, vm=11, action="tick")
    for t in (slow, quick):
        rig.store.add_task(t)
    rig.execution.queue.extend([slow, quick])
    rig.execution.run(rig.execution.take_batch())
    assert rig.execution.queue and _kinds(rig.sent) == ["Started", "Performed"]


def test_performed_is_skipped_from_the_fetchers_lookahead_of_queued_work_on() -> None:
    rig = make_rig(quick=False)
    execution = rig.execution
    ran = task(1, vm=9)
    rig.outcomes.hold(PendingOutcome(ran, Outcome.finished(), now(), now()))  # performed, outcome held
    execution.queue.extend([task(2, vm=10), task(3, vm=11)])
    execution.estimates["touch"] = LOOKAHEAD / 2 * 0.99  # two of them: just under the fetcher's lookahead
    execution._say_performed()
    assert rig.sent == [Performed((1,))]
    execution.estimates["touch"] = LOOKAHEAD / 2  # two of them: the lookahead itself
    execution._say_performed()
    assert rig.sent == [Performed((1,))]  # not again: the slot would get no room from it


def test_queued_work_is_summed_over_the_first_entries_only() -> None:
    rig = make_rig(quick=False)
    execution = rig.execution
    execution.estimates["touch"] = LOOKAHEAD / WORK_SCAN * 0.99  # the whole scan falls just short
    execution.queue.extend(task(i, vm=i) for i in range(1, 2 * WORK_SCAN))
    assert not execution._work_queued(LOOKAHEAD)  # more is queued, but the scan stops: say Performed


def test_a_parked_keys_queued_tasks_are_not_work_to_start() -> None:
    rig = make_rig(quick=False)
    execution = rig.execution
    execution.estimates["touch"] = 0.02
    held = task(1, vm=10, state="running")
    execution.parking.park_for_retry(held, "libvirt busy", 0.0)  # VM 10 waits for a retry
    execution.queue.extend([task(2, vm=10), task(3, vm=10)])  # slow, but only handed back as Deferred
    assert not execution._work_queued(LOOKAHEAD)
    execution.queue.append(task(4, vm=11))
    assert execution._work_queued(LOOKAHEAD)


# -- the fetcher reads them -----------------------------------------------------------------


def test_the_fetcher_acts_on_each_message_of_several(pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    fetcher = object.__new__(Fetcher)  # no database: only what reading a shard's messages touches
    fetcher.config = Config(shards=1)
    fetcher.slots = [ShardLink(0, channel=right)]
    fetcher.dispatch = Dispatcher(1)
    fetcher.book = PartitionBook(8)
    fetcher.rebalancer = SimpleNamespace(tasks_ended=False)  # type: ignore[assignment]
    fetcher.done_total = 0
    fetcher.dispatch.learn("touch", 0.0001)  # known quick: both fit in the slot's window
    first, second = task(1, vm=10), task(2, vm=11)
    for t in (first, second):
        fetcher.dispatch.route(t)
    assert fetcher.dispatch.take_sendable(0) == [first, second]
    wire.send(left, Several((Ended((TaskEnd(1, "finished", 0.001, "touch"),)), Started((2,)))))
    wire.send(left, Performed((2,)))
    fetcher._read_shard(right)
    assert fetcher.done_total == 1 and fetcher.rebalancer.tasks_ended
    assert fetcher.slots[0].current == 2  # Started came after Ended: the slot runs task 2
    assert fetcher.dispatch.held() == 1  # task 1 forgotten, task 2 still held until it ends
    assert not readable_now(right)  # both writes read in one call


def test_the_fetcher_skips_a_channel_replaced_earlier_in_the_same_turn(pair: tuple[Connection, Connection]) -> None:
    """A shard reconnected (accepted earlier in the turn) while its old channel was in the ready list too."""
    left, right = pair
    fetcher = object.__new__(Fetcher)
    fetcher.slots = [ShardLink(0, channel=None)]  # _accept replaced the slot's channel and closed the old one
    wire.send(left, Performed((1,)))
    fetcher._read_shard(right)  # used to raise StopIteration out of the fetcher's loop
    assert fetcher.slots[0].channel is None
