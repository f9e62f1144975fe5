"""The fetcher: claims queued tasks in bulk and routes them to the shards.

::

    tasks table --claim_tasks (oldest first, in bulk)--> waiting[key] --Run (batches)--> shard slot
         ^                                                                               |
         +------------------------------- Ended (after the outcomes are committed) ------+

Each shard has its own socket, so a shard that dies can only break its own
channel. The fetcher keeps what it claimed (``dispatch.Dispatcher``: waiting
per key; sent per slot, not yet ended); a key goes to a slot with room and
stays there while it has tasks in flight, and a slot gets only a few
milliseconds of expected work ahead, so a busy shard never blocks the fetcher
and a drain hands back almost everything from here. When a new shard
connects for a slot, what the slot was sent is checked against the database:
ended tasks are forgotten, ``running`` ones go back to that slot for
reconciliation, the rest again ahead of their keys' later tasks.

In multihost mode the instance owns partitions (docs/partitions.md): every
renewal interval a balancing round (``rebalance.Rebalancer``) acquires,
reserves and hands over partition leases so that each live instance holds
about P/n, and the fetcher claims like standalone, one statement over every
partition it holds, each task under its partition's token
(``partition_book.PartitionBook``): the queue's head in id order while it holds
half the partitions or more (``claim_partition_window``), else one index descent
per held partition (``claim_partition_tasks``). The lease thread renews
the instance's lease every ``lease_renew_interval`` and publishes how long it
is safe to start tasks (``lease_until``, on ``lease_clock``) to the shards; a
renewal the database refuses means other instances may own our partitions
already, so the fetcher exits with EXIT_LEASE_LOST and the supervisor rejoins
under a new instance id.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
from multiprocess.connection import Connection

from taskomatic import config as config_mod
from taskomatic import metrics
from taskomatic.config import Config
from taskomatic.db import claims, partitions
from taskomatic.db.store import Row, Store, connect, listen
from taskomatic.exitcodes import EXIT_LEASE_LOST
from taskomatic.logsetup import set_process_title, setup_logging
from taskomatic.model import TaskRow, key_of, task_from_row
from taskomatic.runtime import channel as wire
from taskomatic.runtime.dispatch import Dispatcher
from taskomatic.runtime.lease import LeaseKeeper, LeaseLost, lease_clock, limit_idle_transaction
from taskomatic.runtime.messages import (
    Deferred,
    Drain,
    Drained,
    Ended,
    FetcherStatus,
    Hello,
    Performed,
    Run,
    Several,
    Started,
)
from taskomatic.runtime.partition_book import PartitionBook
from taskomatic.runtime.readiness import Readiness, readable_now
from taskomatic.runtime.rebalance import Rebalancer
from taskomatic.runtime.router import make_routing, shard_for
from taskomatic.text import first_line

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "taskomatic_new_tasks"
STATUS_INTERVAL = 1.0
STARTUP_WAIT = 30.0  # how long to wait for every shard before adopting held tasks
ANALYZE_CHECK_SECONDS = 10.0  # how often a fetcher with a backlog looks at the tasks table's statistics
ANALYZE_MIN_CHANGES = 50_000  # ...and analyses it once this many rows, and more than it thought it had, changed


@dataclass
class ShardLink:
    """The fetcher's view of one shard slot's process."""

    index: int
    channel: Connection | None = None
    pid: int | None = None
    current: int | None = None
    drained: bool = False


class Fetcher:
    def __init__(self, config: Config, instance_id: int, socket_path: str,
                 supervisor: Connection, lease_until: Any) -> None:
        self.config = config
        self.multihost = config.mode == "multihost"
        self.lease_until = lease_until  # multiprocess Value('d'), shared with the shards
        self.lease_keeper: LeaseKeeper | None = None
        self.next_analyze_check = 0.0
        self.instance_id = instance_id
        self.supervisor = supervisor
        self.slots = [ShardLink(i) for i in range(config.shards)]
        self.signals: list[int] = []
        self.draining = False
        self.stopping_fast = False
        self.adopted = False
        self.started_at = time.monotonic()
        self.done_total = 0
        self.store = Store.open(config.dsn, "taskomatic fetcher", config.connect_timeout, begin_with_first=True)
        # hash routing places partition p on shard p mod N: P as the database records it.
        count = partitions.partition_count(self.store)
        self.store.rollback()
        self.dispatch = Dispatcher(config.shards, routing=make_routing(config.routing, config.shards, count))
        self.book = PartitionBook(count)
        # The balancing round runs on this loop, not on the lease thread: it changes what this
        # loop owns (the book, the dispatcher's queues), and the lease thread stays a bare
        # renewal that a slow round can never delay into a lost lease.
        self.rebalancer = Rebalancer(self.store, lambda: self.config, instance_id, self.book,
                                     self._route_adopted, self._drop_handed_over)
        self.listen_conn = self._listen()
        self.readiness = Readiness()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(socket_path):
            os.unlink(socket_path)  # left by an earlier fetcher of this instance
        self.server.bind(socket_path)
        self.server.listen(64)
        self.server.setblocking(False)

    def _listen(self) -> psycopg2.extensions.connection:
        conn = connect(self.config.dsn, "taskomatic fetcher (listen)", self.config.connect_timeout)
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        listen(conn, NOTIFY_CHANNEL)
        if self.multihost:
            listen(conn, partitions.PARTITIONS_CHANNEL)
        return conn

    def _record_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    # -- main loop ------------------------------------------------------------------
    def serve(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._record_signal)
        if self.config.metrics_port:
            metrics.serve(self.config.metrics_address, self.config.metrics_port, self.config.dsn,
                          lambda: (self.dispatch.held(), sum(s.current is not None for s in self.slots),
                                   self.book.held_count()))
        if self.multihost:
            self.lease_keeper = LeaseKeeper(lambda: self.config, self.instance_id, self.lease_until)
            self.lease_keeper.start()
        try:
            return self._serve()
        except LeaseLost:
            return EXIT_LEASE_LOST
        finally:
            if self.lease_keeper is not None:
                self.lease_keeper.stopping.set()

    def _serve(self) -> int:
        claim_wanted = True
        next_poll = time.monotonic()
        next_status = time.monotonic()
        while True:
            self._handle_signals()
            if self.lease_keeper is not None:
                self.lease_keeper.check()
            if self.stopping_fast:
                self._release_unstarted()
                return 0
            if self.draining and all(s.channel is None or s.drained for s in self.slots):
                self._release_unstarted()
                log.info("drained; handed back the unstarted tasks")
                return 0
            if not self.adopted and (all(s.channel is not None for s in self.slots)
                                     or time.monotonic() - self.started_at > STARTUP_WAIT):
                self._adopt_held()
            now = time.monotonic()
            if now >= next_poll:
                claim_wanted = True
                next_poll = now + self.config.poll_interval
            leased = not self.multihost or lease_clock() < self.lease_until.value
            if self.multihost and self.adopted and not self.draining and leased:
                if self.rebalancer.due(now) and self.rebalancer.round(now):
                    claim_wanted = True  # partitions acquired: their queues are ours to claim
                elif self.rebalancer.release_due(now):
                    self.rebalancer.finish_releases(now)  # a hand-over waits for its last task to end
            # claim_wanted: the queue may hold claimable tasks. It stays set while there is no
            # room, so the next Ended that frees room claims again at once (not at the next poll).
            can_claim = self.adopted and not self.draining and leased and self._room() > 0
            if claim_wanted and can_claim:
                claim_wanted = self._claim()
            for slot in self.slots:
                if slot.channel is not None and not self.draining:
                    self._send_window(slot)
            if now >= next_status:
                self._report_status()
                next_status = now + STATUS_INTERVAL
            busy = claim_wanted and can_claim  # more to claim right away; otherwise sleep until due
            # No balancing timer without a lease: nothing to do then, and no spinning.
            round_timer: tuple[float, ...] = ()
            if self.multihost and self.adopted and leased and not self.draining:
                round_timer = (self.rebalancer.next_round, *((self.rebalancer.next_release_try,)
                                                             if self.rebalancer.release_pending() else ()))
            due = min(next_poll, next_status, *round_timer)
            timeout = 0.0 if busy else max(0.0, due - time.monotonic())
            if self._wait(timeout):
                claim_wanted = True

    def _wait(self, timeout: float) -> bool:
        """Wait for shard messages, new shards or a notification; True if notified."""
        channels = [s.channel for s in self.slots if s.channel is not None]
        ready = self.readiness.wait([*channels, self.server, self.listen_conn], timeout)
        notified = False
        for obj in ready:
            if obj is self.server:
                self._accept()
            elif obj is self.listen_conn:
                self.listen_conn.poll()
                for notice in self.listen_conn.notifies:
                    if notice.channel == partitions.PARTITIONS_CHANNEL:
                        self.rebalancer.announced(notice.payload)
                    else:
                        notified = True
                self.listen_conn.notifies.clear()
            else:
                self._read_shard(obj)
        return notified

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGTERM and not self.draining:
                log.info("draining: no more claims; shards finish their current task")
                self.draining = True
                for slot in self.slots:
                    self._send(slot, Drain())
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stopping_fast = True
            elif signum == signal.SIGHUP:
                try:
                    self.config = config_mod.reload(self.config)
                except config_mod.ConfigError as exc:
                    log.error("reload refused, keeping the old configuration: %s", exc)

    # -- shards -------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self.server.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        channel = Connection(sock.detach())
        if not channel.poll(5):
            channel.close()
            return
        try:
            hello = wire.recv(channel)
        except (EOFError, OSError, ValueError, TypeError, AttributeError, ImportError, IndexError):
            channel.close()
            return
        if not isinstance(hello, Hello) or not 0 <= hello.slot < len(self.slots):
            log.error("unexpected first message from a shard: %r", hello)
            channel.close()
            return
        slot = self.slots[hello.slot]
        if slot.channel is not None:
            slot.channel.close()
        slot.channel, slot.pid, slot.drained, slot.current = channel, hello.pid, False, None
        self._resync(slot)
        log.info("shard %d connected (pid %d)", slot.index, hello.pid)
        if self.draining:
            self._send(slot, Drain())

    def _resync(self, slot: ShardLink) -> None:
        """A shard (re)connected; send again what the slot lost."""
        lost = self.dispatch.shard_connected(slot.index)
        if not lost:
            return
        rows = claims.held_tasks_by_id(self.store, self.instance_id, lost)
        self.store.rollback()
        again = [task_from_row(r) for r in rows]
        self.done_total += len(lost) - len(again)
        for task_id in set(lost) - {t.id for t in again}:
            self.book.ended(task_id)
        if again:
            log.info("shard %d lost %d tasks; resending (%d to reconcile)", slot.index, len(again),
                     sum(t.state == "running" for t in again))
        self.dispatch.requeue(slot.index, again)

    def _read_shard(self, channel: Connection) -> None:
        slot = next((s for s in self.slots if s.channel is channel), None)
        if slot is None:
            # Replaced earlier in this turn: its shard reconnected (``_accept`` closed the old channel
            # and resynced the slot). What it still held is lost, as on any broken channel. (The poll
            # lists shard channels before the listening socket, so today this is not reached.)
            return
        try:
            while readable_now(channel):
                message = wire.recv(channel)
                for one in message.messages if isinstance(message, Several) else (message,):
                    self._handle(slot, one)
        except (EOFError, OSError):
            if not slot.drained:
                log.warning("shard %d disconnected with %d tasks in hand", slot.index,
                            len(self.dispatch.slots[slot.index].sent))
            channel.close()
            slot.channel = None
            slot.current = None
            self.dispatch.shard_gone(slot.index)

    def _handle(self, slot: ShardLink, message: object) -> None:
        if isinstance(message, Ended):
            for end in message.ends:
                self.dispatch.ended(slot.index, end.task_id)
                if end.seconds is not None:
                    self.dispatch.learn(end.action, end.seconds)
                self.book.ended(end.task_id)
            self.rebalancer.tasks_ended = True
            slot.current = None
            self.done_total += len(message.ends)
        elif isinstance(message, Performed):
            self.dispatch.performed(slot.index, message.task_ids)
        elif isinstance(message, Deferred):
            self.dispatch.defer(slot.index, message.task_ids)
        elif isinstance(message, Started):
            slot.current = message.task_ids[-1]
        elif isinstance(message, Drained):
            slot.drained = True
            self.dispatch.returned(slot.index, message.returned)
            for task_id in message.returned:
                self.book.ended(task_id)

    def _send(self, slot: ShardLink, message: object) -> bool:
        if slot.channel is None:
            return False
        try:
            wire.send(slot.channel, message)
            return True
        except (OSError, EOFError):
            slot.channel.close()
            slot.channel = None
            self.dispatch.shard_gone(slot.index)
            return False

    def _send_window(self, slot: ShardLink) -> None:
        batch = self.dispatch.take_sendable(slot.index)
        if batch and not self._send(slot, Run(tuple(batch))):
            self.dispatch.unsend(slot.index, batch)

    # -- database ---------------------------------------------------------------------
    def _adopt_held(self) -> None:
        """Route every task we hold that no shard has: left by a dead fetcher or an earlier crash."""
        in_hand = self.dispatch.in_hand()
        rows = claims.held_tasks(self.store, self.instance_id)
        leases = partitions.held_partitions(self.store, self.instance_id) if self.multihost else {}
        releasing = partitions.releasing_partitions(self.store, self.instance_id) if self.multihost else set()
        self.store.rollback()
        for partition, token in leases.items():
            self.book.hold(partition, token, releasing=partition in releasing)
        for row in rows:  # in hand of a shard or not: they count against their partition
            self.book.add(task_from_row(row))
        adopted = [(task_from_row(r), r["run_by_shard"]) for r in rows if r["id"] not in in_hand]
        for task, slot in adopted:
            self.dispatch.route(task, self._settling_slot(task, slot))
        if leases:
            log.info("holding %d partitions from before this fetcher started", len(leases))
        if adopted:
            log.info("adopted %d held tasks (%d to reconcile)", len(adopted),
                     sum(t.state == "running" for t, _ in adopted))
        self.adopted = True

    def _settling_slot(self, task: TaskRow, run_by_shard: int | None) -> int | None:
        """The slot a task committed running must go back to: only that slot's shard may settle it."""
        if task.state != "running":
            return None
        if run_by_shard is not None and 0 <= run_by_shard < len(self.slots):
            return run_by_shard
        # Marked by a shard slot we no longer have (--shards changed) or before slots were
        # recorded: no shard of ours runs it now, any slot may settle it; the key's hash picks one.
        return shard_for(key_of(task), len(self.slots))

    def _room(self) -> int:
        """How many tasks to claim now; 0 while the held tasks are near the cap (no tiny claims)."""
        capacity = len(self.slots) * self.config.max_claimed_per_shard
        held = self.dispatch.held()
        room = min(self.config.claim_batch, capacity - held)
        if room <= 0 or (room < self.config.claim_batch // 4 and held > 0):
            return 0
        return room

    def _claim(self) -> bool:
        """Claim a batch (there is room); True if more may be waiting."""
        room = self._room()
        saturated = False
        if self.multihost:
            held = self.book.claimable()
            if not held:
                return False
            window = self.book.claim_window(room)
            with self.store.transaction():
                limit_idle_transaction(self.store, self.config)
                if window:
                    rows, scanned = partitions.claim_partition_window(self.store, self.instance_id, held, window,
                                                                      room, last=True)
                else:
                    caps = self.book.claim_caps(room)
                    rows = partitions.claim_partition_tasks(self.store, self.instance_id, held, caps, room, last=True)
            if window:
                saturated = self.book.window_claimed(len(rows), scanned, window, room)
            else:  # a partition that gave all it was allowed may have more: claim again at once
                saturated = self.book.claimed(caps, Counter(r["partition"] for r in rows), room)
            for row in rows:  # in id order
                task = task_from_row(row, held[row["partition"]])
                self.book.add(task)
                self.dispatch.route(task)
        else:
            with self.store.transaction():
                rows = claims.claim_tasks(self.store, self.instance_id, room, last=True)
            for row in sorted(rows, key=lambda r: r["id"]):
                self.dispatch.route(task_from_row(row))
        if rows:
            log.debug("claimed %d tasks", len(rows))
        if len(rows) == room:
            self._analyze_if_stale()
        return len(rows) == room or (self.multihost and saturated)

    def _analyze_if_stale(self) -> None:
        """After a bulk insert, refresh the tasks table's statistics rather than wait for autovacuum.

        Until they are refreshed the planner believes the table holds what it
        held before, and the shards' writes by task id may walk the claimed
        tasks' index, dead entries and all: after 1,000,000 tasks were queued at
        once, tasks/s fell from 8,000 to 2,200 over the minute before autovacuum
        analysed the table, then ran at 20,000. Checked at most every
        ANALYZE_CHECK_SECONDS, while claims come back full (a backlog).
        """
        now = time.monotonic()
        if now < self.next_analyze_check:
            return
        self.next_analyze_check = now + ANALYZE_CHECK_SECONDS
        row = claims.tasks_changes_since_analyze(self.store)
        self.store.rollback()
        if row is None or row["changed"] < max(ANALYZE_MIN_CHANGES, row["estimated"]):
            return
        log.info("the tasks table changed by %d rows since its statistics were taken (they count %d); "
                 "analysing it now", row["changed"], row["estimated"])
        with self.store.transaction():
            claims.analyze_tasks(self.store)

    def _route_adopted(self, rows: list[Row]) -> None:
        """Tasks adopted with partitions just acquired (an earlier holder had claimed them), in id order."""
        for row in rows:
            task = task_from_row(row, self.book.token_of(row["partition"]))
            self.book.add(task)
            self.dispatch.route(task, self._settling_slot(task, row.get("run_by_shard")))

    def _drop_handed_over(self, handed_over: set[int]) -> None:
        """Partitions being handed over: their tasks we had not sent are back in the queue, not ours."""
        for task_id in self.dispatch.drop_partitions(handed_over):
            self.book.ended(task_id)

    def _release_unstarted(self) -> None:
        with self.store.transaction():
            released = claims.release_unstarted(self.store, self.instance_id)
            freed = partitions.release_idle_partitions(self.store, self.instance_id) if self.multihost else []
            if freed:
                partitions.announce_partition_moves(self.store, self.instance_id)
        if released:
            log.info("handed back %d claimed tasks that had not started", released)
        if freed:
            self.book.released(freed)
            log.info("released %d partitions", len(freed))
            metrics.partitions_given(len(freed))

    def _report_status(self) -> None:
        status = FetcherStatus(
            all_shards_up=self.adopted and all(s.channel is not None for s in self.slots),
            queued_local=self.dispatch.held(),
            running=sum(s.current is not None for s in self.slots),
            done_total=self.done_total,
            shards_connected=sum(s.channel is not None for s in self.slots),
        )
        try:
            self.supervisor.send(status)
        except (OSError, EOFError):
            # The supervisor is gone: nothing will restart us or the shards.
            log.error("lost the supervisor; stopping fast")
            self.stopping_fast = True


def fetcher_main(config: Config, instance_id: int, socket_path: str, supervisor: Connection,
                 lease_until: Any) -> None:
    setup_logging(config.log_level, role=f"instance {instance_id} fetcher")
    set_process_title(f"taskomatic: fetcher ({config.shards} shards)")
    try:
        fetcher = Fetcher(config, instance_id, socket_path, supervisor, lease_until)
    except KeyboardInterrupt:  # the supervisor stopping everything while we started (a rejoin)
        raise SystemExit(0) from None
    except Exception:
        log.exception("fetcher failed to start")
        raise SystemExit(3) from None
    try:
        code = fetcher.serve()
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        # Expected when the database restarts or is cut off: the supervisor starts a new
        # fetcher, which adopts what this one held. One line, no traceback.
        log.error("fetcher lost its database connection (%s); exiting to be replaced", first_line(exc))
        raise SystemExit(1) from None
    raise SystemExit(code)

