"""The partition lease protocol, run against the real SQL on a real PostgreSQL.

A model of several machines (``HOSTS``, each running one instance at a time)
that balance the P partitions among themselves (``taskomatic.partitions.balance``
on what ``partition_view`` shows), acquire free or expired partitions and adopt
their tasks, reserve a live instance's surplus, hand partitions over
cooperatively (``begin_release``: no more starts, unstarted tasks back; then
``release_partitions`` once nothing runs), claim tasks in bulk, start, end and
reconcile them with fenced writes, leave gracefully, crash (and restart under a
new id), pause past their lease, and stall inside a fenced write while another
instance tries to take the partition. Leases expire on a virtual clock. Every
step runs the named queries through ``taskomatic.db.partitions``, each instance
on its own connection, and the model predicts what each must return. Checked
from the database after every step:

(a) one holder per partition, and only it, under its current token and while
    its lease is live, passes the fence (``hold_partitions``), starts
    (``mark_running_fenced``) or ends (``record_outcomes_fenced``) its tasks:
    a writer whose token is not current writes nothing (probed for every
    (instance, token) ever seen, in a rolled-back transaction);
(b) per partition, tokens strictly increase over its hand-overs;
(c) no task is claimed by an instance other than its partition's holder (so
    never by two), and a key's tasks are claimed in id order: per key, in id
    order, the states read ended* running? claimed* unclaimed*, ended tasks
    did not overlap in time, and every task's partition is its key's;
(d) in the end (teardown) everything recovers and drains: every task ended
    exactly once.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from taskomatic.db import partitions as dbp
from taskomatic.db.store import Row, Store
from taskomatic.model import OrderingKey
from taskomatic.partitions import DEFAULT_PARTITIONS, balance, partition_of
from tests.property.protocol_connections import Connections, protocol_connections

P = DEFAULT_PARTITIONS
HOSTS = 3
LEASE = 10  # virtual seconds
DB_LEASE = 3600.0  # what the database is told; the model writes lease_expires_at itself (sync_leases)
EPOCH = datetime(2030, 1, 1, tzinfo=UTC)
TERMINAL = ("finished", "failed")
VERDICTS = ("done", "rerun", "neither")


def _keys() -> tuple[OrderingKey, ...]:
    """Two VMs that share a partition, and two keys of partitions of their own."""
    seen: dict[int, int] = {}
    for ident in range(1, 10_000):
        p = partition_of(OrderingKey("Vm", ident), P)
        if p in seen:
            pair = (OrderingKey("Vm", seen[p]), OrderingKey("Vm", ident))
            break
        seen[p] = ident
    others = [k for k in (OrderingKey("StoragePool", 1), OrderingKey("Vm", 10_001))
              if partition_of(k, P) != partition_of(pair[0], P)]
    return (*pair, *others)


KEYS = _keys()
KEY_PARTITIONS = sorted({partition_of(k, P) for k in KEYS})
ACTIONS = {"StoragePool": "refresh_pool", "Vm": "start_vm"}


@dataclass
class Lease:
    instance: int | None = None
    token: int = 0
    releasing: bool = False
    wanted: int | None = None


@dataclass
class Task:
    key: OrderingKey
    state: str = "queued"
    claimed_by: int | None = None
    ends: int = 0

    @property
    def partition(self) -> int:
        return partition_of(self.key, P)


@dataclass
class Host:
    store: Store
    status: str = "down"  # down | up | paused
    instance: int | None = None
    held: dict[int, int] = field(default_factory=dict)  # partition -> token, as the instance believes
    local: dict[int, str] = field(default_factory=dict)  # task id -> queued | running | adopted


class PartitionProtocol(RuleBasedStateMachine):
    def __init__(self, conns: Connections) -> None:
        super().__init__()
        for store in (conns.probe, *conns.hosts):
            store.rollback()
        self.admin, self.probe = conns.admin, conns.probe
        # TRUNCATE ... CASCADE empties partition_leases too (it references instances): put the rows
        # back. partition_lease_tokens is not reset: tokens only have to increase.
        self.sql("TRUNCATE tasks, partition_leases, instances RESTART IDENTITY CASCADE")
        self.sql("INSERT INTO partition_leases (partition) SELECT generate_series(0, %(last)s)", last=P - 1)
        self.hosts = [Host(store) for store in conns.hosts]
        self.now = 0.0
        self.events = 0
        self.expires: dict[int, float] = {}  # instance -> virtual lease end (stopped: already past)
        self.tasks: dict[int, Task] = {}
        self.leases: dict[int, Lease] = {p: Lease() for p in range(P)}
        self.tokens: dict[int, list[int]] = {p: [] for p in range(P)}
        self.holders: dict[int, set[int]] = {p: set() for p in KEY_PARTITIONS}

    # -- plumbing ---------------------------------------------------------------------------
    def sql(self, text: str, **params: Any) -> list[Row]:
        with self.admin.conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(text, params)
            return [dict(r) for r in cur.fetchall()] if cur.description else []

    def stamp(self) -> datetime:
        self.events += 1
        return EPOCH + timedelta(seconds=self.now, microseconds=self.events)

    def live(self, instance: int | None) -> bool:
        return instance is not None and self.expires[instance] > self.now

    def ids(self, *statuses: str) -> list[int]:
        return [i for i, h in enumerate(self.hosts) if h.status in statuses]

    @staticmethod
    def pick(options: list[Any], pick: int) -> Any:
        return options[pick % len(options)]

    def current(self, instance: int | None, partition: int, token: int) -> bool:
        lease = self.leases[partition]
        return lease.instance == instance and lease.token == token and self.live(instance)

    def sync_leases(self) -> None:
        """Make lease_expires_at say what the virtual clock says (the virtual clock)."""
        live = [i for i in self.expires if self.live(i)]
        self.sql("UPDATE instances SET lease_expires_at = CASE WHEN id = ANY(%(live)s::bigint[]) "
                 "THEN clock_timestamp() + interval '1 hour' ELSE clock_timestamp() - interval '1 second' END",
                 live=live)

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for i in self.ids("up"):
            h = self.hosts[i]
            with h.store.transaction():
                row = h.store.one("renew_lease", instance_id=h.instance, lease=DB_LEASE)
            assert row is not None, f"live instance {h.instance} could not renew"
            assert h.instance is not None
            self.expires[h.instance] = self.now + LEASE
        self.sync_leases()

    def join_host(self, i: int) -> None:
        h = self.hosts[i]
        with h.store.transaction():
            instance = int(h.store.scalar("register_instance", hostname=f"host{i}", pid=100 + i, version="test",
                                          mode="multihost", shards=2, lease=DB_LEASE))
        assert instance not in self.expires
        self.expires[instance] = self.now + LEASE
        h.status, h.instance, h.held, h.local = "up", instance, {}, {}

    def forget(self, h: Host) -> None:
        h.status, h.instance, h.held, h.local = "down", None, {}, {}

    def drop_partition(self, h: Host, partition: int) -> None:
        """The instance learnt it no longer holds a partition: it forgets it and its tasks."""
        h.held.pop(partition, None)
        for tid in [t for t in h.local if self.tasks[t].partition == partition]:
            del h.local[tid]

    # -- protocol steps -----------------------------------------------------------------------
    def rebalance_for(self, h: Host, locked: frozenset[int] = frozenset()) -> None:
        """What the fetcher does each renewal interval: look, plan, acquire and adopt, ask, give."""
        me = h.instance
        assert me is not None
        with h.store.transaction():
            view = dbp.partition_view(h.store)
            live = dbp.live_multihost_instances(h.store)
        assert live == sorted(i for i in self.expires if self.live(i))
        owners = {lease.partition: lease.instance_id for lease in view}
        assert owners == {p: lease.instance for p, lease in self.leases.items()}
        plan = balance(me, live, owners, P)
        self.acquire_for(h, list(plan.acquire), locked)
        busy = [p for p in plan.acquire if self.live(self.leases[p].instance) and self.leases[p].instance != me]
        made = [p for p in busy if self.leases[p].wanted != me
                and (self.leases[p].wanted is None or not self.live(self.leases[p].wanted)) and self.live(me)]
        dropped = [p for p, lease in self.leases.items() if lease.wanted == me and p not in busy]
        with h.store.transaction():
            got = dbp.request_partitions(h.store, me, busy)
        assert got == dbp.Reservations(tuple(sorted(made)), tuple(sorted(dropped))), (busy, got, made, dropped)
        for p in made:
            self.leases[p].wanted = me
        for p in dropped:
            self.leases[p].wanted = None
        give = {p: h.held[p] for p in plan.release if p in h.held and not self.leases[p].releasing}
        if give:
            self.begin_release_for(h, give)

    def acquire_for(self, h: Host, wanted: list[int], locked: frozenset[int] = frozenset()) -> list[int]:
        me = h.instance
        assert me is not None

        def takeable(p: int) -> bool:
            lease = self.leases[p]
            holder_gone = lease.instance is None or (lease.instance != me and not self.live(lease.instance))
            reserved = lease.wanted is not None and lease.wanted != me and self.live(lease.wanted)
            return holder_gone and not reserved and self.live(me) and p not in locked

        expected = sorted(p for p in set(wanted) if takeable(p))
        with h.store.transaction():
            got = dbp.acquire_partitions(h.store, me, wanted)
            adopted = dbp.adopt_partition_tasks(h.store, me, [a.partition for a in got])
        assert [a.partition for a in got] == expected, f"acquire({sorted(wanted)}) = {got}, expected {expected}"
        for a in got:
            assert a.previous == self.leases[a.partition].instance, (a, self.leases[a.partition])
            self.note_lease(a.partition, me, a.token)
            h.held[a.partition] = a.token
        taken = {a.partition for a in got}
        should_adopt = sorted(tid for tid, t in self.tasks.items() if t.partition in taken
                              and t.claimed_by not in (None, me) and t.state in ("queued", "running"))
        assert [r["id"] for r in adopted] == should_adopt, f"adopted {adopted}, expected {should_adopt}"
        for r in adopted:
            task = self.tasks[r["id"]]
            assert r["state"] == task.state and r["partition"] == task.partition, (r, task)
            task.claimed_by = me
            h.local[r["id"]] = "adopted" if task.state == "running" else "queued"
        return sorted(taken)

    def note_lease(self, partition: int, instance: int, token: int) -> None:
        seen = self.tokens[partition]
        assert not seen or token > seen[-1], f"partition {partition}: token {token} after {seen}"
        seen.append(token)
        if partition in self.holders:
            self.holders[partition].add(instance)
        wanted = self.leases[partition].wanted
        self.leases[partition] = Lease(instance, token, False, None)
        del wanted  # acquiring clears the reservation, whoever made it

    def unclaim(self, me: int, partition: int) -> list[int]:
        back = sorted(tid for tid, t in self.tasks.items()
                      if t.claimed_by == me and t.partition == partition and t.state == "queued")
        for tid in back:
            self.tasks[tid].claimed_by = None
        return back

    def begin_release_for(self, h: Host, give: dict[int, int]) -> None:
        me = h.instance
        assert me is not None
        expected = sorted(p for p, t in give.items() if self.leases[p].instance == me and self.leases[p].token == t)
        with h.store.transaction():
            got = dbp.begin_release(h.store, me, give)
        assert list(got.partitions) == expected, f"begin_release({give}) = {got}, expected {expected}"
        back = []
        for p in got.partitions:
            self.leases[p].releasing = True
            back += self.unclaim(me, p)
        assert got.unclaimed == len(back), (got, back)
        for tid in back:
            del h.local[tid]

    def finish_release_for(self, h: Host) -> None:
        me = h.instance
        assert me is not None
        give = {p: t for p, t in h.held.items() if self.leases[p].releasing}
        if not give:
            return

        def running(p: int) -> bool:
            return any(t.claimed_by == me and t.partition == p and t.state == "running" for t in self.tasks.values())

        expected = sorted(p for p, t in give.items()
                          if self.leases[p].instance == me and self.leases[p].token == t and not running(p))
        with h.store.transaction():
            got = dbp.release_partitions(h.store, me, give)
        assert list(got.partitions) == expected, f"release_partitions({give}) = {got}, expected {expected}"
        back = []
        for p in got.partitions:
            back += self.unclaim(me, p)
            lease = self.leases[p]
            lease.instance, lease.releasing = None, False
            self.drop_partition(h, p)
        assert got.unclaimed == len(back) == 0, (got, back)  # begin_release already handed them back

    def claim_for(self, h: Host, per_partition: int, limit: int) -> None:
        me = h.instance
        assert me is not None
        ours = sorted(p for p, t in h.held.items() if self.current(me, p, t) and not self.leases[p].releasing)
        # The oldest of each partition (at most per_partition), then the oldest of those.
        offered = [tid for p in ours
                   for tid in sorted(tid for tid, t in self.tasks.items()
                                     if t.partition == p and t.state == "queued" and t.claimed_by is None)
                   [:per_partition]]
        expected = sorted(offered)[:limit]
        with h.store.transaction():
            got = dbp.claim_partition_tasks(h.store, me, h.held, per_partition, limit)
        assert [r["id"] for r in got] == expected, \
            f"claim of {limit}, {per_partition} per partition (held {h.held}): {got}, expected {expected}"
        for r in got:
            assert r["state"] == "queued" and r["partition"] == self.tasks[r["id"]].partition
            self.tasks[r["id"]].claimed_by = me
            h.local[r["id"]] = "queued"

    def window_claim_for(self, h: Host, window: int, limit: int) -> None:
        """The id-order claim: of the ``window`` oldest unclaimed queued tasks of all, the oldest ``limit`` of
        the partitions held under a current token and not releasing."""
        me = h.instance
        assert me is not None
        ours = {p for p, t in h.held.items() if self.current(me, p, t) and not self.leases[p].releasing}
        head = sorted(tid for tid, t in self.tasks.items() if t.state == "queued" and t.claimed_by is None)[:window]
        expected = [tid for tid in head if self.tasks[tid].partition in ours][:limit]
        with h.store.transaction():
            got, scanned = dbp.claim_partition_window(h.store, me, h.held, window, limit)
        assert [r["id"] for r in got] == expected, \
            f"window claim of {limit} in {window} (held {h.held}): {got}, expected {expected}"
        assert scanned == (len(head) if h.held else 0), (scanned, head)  # holding nothing: no statement
        for r in got:
            assert r["state"] == "queued" and r["partition"] == self.tasks[r["id"]].partition
            self.tasks[r["id"]].claimed_by = me
            h.local[r["id"]] = "queued"

    def next_task(self, h: Host, key: OrderingKey) -> int | None:
        mine = [tid for tid in h.local if self.tasks[tid].key == key]
        return min(mine) if mine else None

    def writable(self, status: str = "up") -> list[tuple[int, int]]:
        """(host, task) for the next task of every key a host has in hand."""
        found = []
        for i in self.ids(status):
            h = self.hosts[i]
            for key in KEYS:
                tid = self.next_task(h, key)
                if tid is not None:
                    found.append((i, tid))
        return found

    def write(self, h: Host, tid: int, how: str) -> bool:
        """Start, end or reconcile a task with a fenced write; the model says whether it must go through."""
        me = h.instance
        assert me is not None
        task = self.tasks[tid]
        p = task.partition
        token = h.held[p]
        ours = self.current(me, p, token) and task.claimed_by == me
        held = {p: token}
        with h.store.transaction():
            if how == "start":
                allowed = ours and task.state == "queued" and not self.leases[p].releasing
                done = dbp.mark_running_fenced(h.store, me, held, [tid], 0, self.stamp()) == [tid]
            elif how == "rerun":
                allowed = ours and task.state == "running"
                done = bool(dbp.hold_partitions(h.store, me, held, starting=False)) and h.store.one(
                    "mark_rerun", instance_id=me, shard=0, task_id=tid, time_started=self.stamp()) is not None
            else:
                allowed = ours and task.state == "running"
                state = "finished" if how in ("finished", "done") else "failed"
                message = None if state == "finished" else f"{how}: the action failed"
                done = dbp.record_outcomes_fenced(h.store, me, held, [
                    dbp.Outcome(tid, state, message, None, self.stamp())]) == [tid]
        assert done == allowed, f"{how} of task {tid} by {me} (token {token}, lease {self.leases[p]}): {done}"
        if not done:
            self.drop_partition(h, p)
            return False
        if how in ("start", "rerun"):
            task.state = "running"
            h.local[tid] = "running"
        else:
            assert task.ends == 0, f"task {tid} ends twice"
            task.ends += 1
            task.state = "finished" if how in ("finished", "done") else "failed"
            del h.local[tid]
        return True

    def how_for(self, h: Host, tid: int, choice: int) -> str:
        local = h.local[tid]
        if local == "queued":
            return "start"
        if local == "running":
            return ("finished", "finished", "failed")[choice % 3]
        return VERDICTS[choice % len(VERDICTS)]

    def resume_host(self, i: int) -> None:
        h = self.hosts[i]
        assert h.instance is not None
        if self.live(h.instance):
            h.status = "up"
            return
        # Its lease ran out while it slept: every write it tries is refused, it claims nothing,
        # acquires nothing, and then learns (renew_lease has no row) and rejoins under a new id.
        while mine := [t for j, t in self.writable("paused") if j == i]:
            assert not self.write(h, mine[0], self.how_for(h, mine[0], 0))  # and it forgets that partition
        with h.store.transaction():
            assert dbp.claim_partition_tasks(h.store, h.instance, h.held, 0, 100) == []
            assert dbp.acquire_partitions(h.store, h.instance, range(P)) == []
            assert h.store.one("renew_lease", instance_id=h.instance, lease=DB_LEASE) is None
        self.forget(h)
        self.join_host(i)

    # -- rules ----------------------------------------------------------------------------------
    @initialize(hosts=st.integers(1, HOSTS), keys=st.lists(st.sampled_from(KEYS), min_size=3, max_size=10))
    def start_up(self, hosts: int, keys: list[OrderingKey]) -> None:
        for i in range(hosts):
            self.join_host(i)
        for key in keys:
            self.submit(key, 1)

    @precondition(lambda self: self.ids("up"))
    @rule(choices=st.lists(st.integers(0, 2**16), min_size=1, max_size=6))
    def progress(self, choices: list[int]) -> None:
        """A few natural moves of running instances (rebalance, claim, write, finish a hand-over):
        the rules below make each on purpose; this one keeps the work going whatever the state."""
        for choice in choices:
            ups = self.ids("up")
            choice, n = divmod(choice, len(ups))
            h = self.hosts[ups[n]]
            writes = [tid for j, tid in self.writable() if self.hosts[j] is h]
            moves = ["rebalance", "claim"] + ["write"] * 3 * bool(writes) + ["release"] * any(
                self.leases[p].releasing for p in h.held)
            choice, m = divmod(choice, len(moves))
            if moves[m] == "rebalance":
                self.rebalance_for(h)
            elif moves[m] == "claim":
                self.claim_for(h, 1 + choice % 3, 1 + choice % 4)
            elif moves[m] == "write":
                tid = writes[choice % len(writes)]
                self.write(h, tid, self.how_for(h, tid, choice // len(writes)))
            else:
                self.finish_release_for(h)

    @rule(key=st.sampled_from(KEYS), n=st.integers(1, 3))
    def submit(self, key: OrderingKey, n: int) -> None:
        for _ in range(n):
            tid = int(self.admin.scalar("submit_task", target_type=key.kind, target_id=key.ident,
                                        action=ACTIONS[key.kind], args="{}", submitted_by="partition protocol test"))
            self.tasks[tid] = Task(key)

    @precondition(lambda self: self.ids("down"))
    @rule(pick=st.integers(0, HOSTS - 1))
    def join(self, pick: int) -> None:
        self.join_host(self.pick(self.ids("down"), pick))

    @precondition(lambda self: self.ids("up"))
    @rule(pick=st.integers(0, HOSTS - 1))
    def rebalance(self, pick: int) -> None:
        self.rebalance_for(self.hosts[self.pick(self.ids("up"), pick)])

    @precondition(lambda self: self.ids("up"))
    @rule(pick=st.integers(0, HOSTS - 1), per_partition=st.integers(1, 4), limit=st.integers(1, 6))
    def claim(self, pick: int, per_partition: int, limit: int) -> None:
        self.claim_for(self.hosts[self.pick(self.ids("up"), pick)], per_partition, limit)

    @precondition(lambda self: self.ids("up"))
    @rule(pick=st.integers(0, HOSTS - 1), window=st.integers(1, 8), limit=st.integers(1, 6))
    def claim_window(self, pick: int, window: int, limit: int) -> None:
        self.window_claim_for(self.hosts[self.pick(self.ids("up"), pick)], window, limit)

    @precondition(lambda self: self.writable())
    @rule(pick=st.integers(0, 31), choice=st.integers(0, 5))
    def write_task(self, pick: int, choice: int) -> None:
        i, tid = self.pick(self.writable(), pick)
        h = self.hosts[i]
        self.write(h, tid, self.how_for(h, tid, choice))

    @precondition(lambda self: self.ids("up"))
    @rule(pick=st.integers(0, HOSTS - 1))
    def finish_release(self, pick: int) -> None:
        self.finish_release_for(self.hosts[self.pick(self.ids("up"), pick)])

    @precondition(lambda self: self.ids("up"))
    @rule(pick=st.integers(0, HOSTS - 1))
    def leave(self, pick: int) -> None:
        """Graceful leave: unstarted tasks back, idle partitions freed, lease ended; a new incarnation joins."""
        self.leave_host(self.pick(self.ids("up"), pick), rejoin=True)

    def leave_host(self, i: int, rejoin: bool) -> None:
        h = self.hosts[i]
        me = h.instance
        assert me is not None
        with h.store.transaction():
            h.store.run("release_unstarted", instance_id=me)
            freed = dbp.release_idle_partitions(h.store, me)
            h.store.run("end_lease", instance_id=me)
            h.store.run("instance_stopped", instance_id=me)
        for task in self.tasks.values():
            if task.claimed_by == me and task.state == "queued":
                task.claimed_by = None
        running = {t.partition for t in self.tasks.values() if t.claimed_by == me and t.state == "running"}
        expected = sorted(p for p, lease in self.leases.items() if lease.instance == me and p not in running)
        assert freed == expected, f"release_idle_partitions: {freed}, expected {expected}"
        for p in freed:
            self.leases[p].instance, self.leases[p].releasing = None, False
        self.expires[me] = min(self.expires[me], self.now)
        self.forget(h)
        if rejoin:
            self.join_host(i)

    @precondition(lambda self: self.ids("up", "paused"))
    @rule(pick=st.integers(0, HOSTS - 1))
    def crash(self, pick: int) -> None:
        i = self.pick(self.ids("up", "paused"), pick)
        self.forget(self.hosts[i])
        self.join_host(i)

    @precondition(lambda self: self.ids("up"))
    @rule(pick=st.integers(0, HOSTS - 1))
    def pause(self, pick: int) -> None:
        self.hosts[self.pick(self.ids("up"), pick)].status = "paused"

    @precondition(lambda self: self.ids("paused"))
    @rule(pick=st.integers(0, HOSTS - 1))
    def resume(self, pick: int) -> None:
        self.resume_host(self.pick(self.ids("paused"), pick))

    @rule(seconds=st.integers(1, 2 * LEASE))
    def advance_clock(self, seconds: int) -> None:
        self.tick(seconds)

    @precondition(lambda self: self.writable())
    @rule(pick=st.integers(0, 31), taker=st.integers(0, HOSTS - 1), rebalance=st.booleans())
    def freeze(self, pick: int, taker: int, rebalance: bool) -> None:
        """An instance with work in hand freezes past its lease (SIGSTOP, a cut cable); another
        may take its partitions over (adopting its tasks) before it wakes up. Every write it then
        tries is refused, taken over or not."""
        i, _ = self.pick(self.writable(), pick)
        self.hosts[i].status = "paused"
        self.tick(LEASE)
        others = self.ids("up")
        if rebalance and others:
            self.rebalance_for(self.hosts[self.pick(others, taker)])
        self.resume_host(i)

    @precondition(lambda self: self.writable() and len(self.ids("up")) > 1)
    @rule(pick=st.integers(0, 31), choice=st.integers(0, 5), taker=st.integers(0, HOSTS - 1))
    def stall_mid_write(self, pick: int, choice: int, taker: int) -> None:
        """An instance passes the fence (the lease row locked, shared), then stalls past its lease
        before writing; another instance rebalances meanwhile and must pass that partition by
        (SKIP LOCKED), so the stalled write still goes through: no one else started on it."""
        i, tid = self.pick(self.writable(), pick)
        h = self.hosts[i]
        me = h.instance
        assert me is not None
        how = self.how_for(h, tid, choice)
        task = self.tasks[tid]
        p = task.partition
        if not (self.current(me, p, h.held[p]) and task.claimed_by == me
                and not (how == "start" and self.leases[p].releasing)):
            return
        with h.store.transaction():
            assert dbp.hold_partitions(h.store, me, {p: h.held[p]}, starting=how == "start") == {p}
            h.status = "paused"
            self.tick(LEASE)
            assert not self.live(me)
            others = [j for j in self.ids("up") if j != i]
            self.rebalance_for(self.hosts[self.pick(others, taker)], locked=frozenset([p]))
            assert self.leases[p].instance == me
            if how == "start":
                assert h.store.one("mark_running", instance_id=me, task_ids=[tid], shard=0,
                                   time_started=self.stamp()) is not None
            elif how == "rerun":
                assert h.store.one("mark_rerun", instance_id=me, shard=0, task_id=tid,
                                   time_started=self.stamp()) is not None
            else:
                state = "finished" if how in ("finished", "done") else "failed"
                assert h.store.one("record_outcomes", instance_id=me, task_ids=[tid], states=[state],
                                   messages=[None if state == "finished" else "failed"], starts=[None],
                                   ends=[self.stamp()]) is not None
        if how in ("start", "rerun"):
            task.state, h.local[tid] = "running", "running"
        else:
            task.ends += 1
            task.state = "finished" if how in ("finished", "done") else "failed"
            del h.local[tid]

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def database_agrees(self) -> None:
        for h in self.hosts:
            assert h.store.conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        rows = self.sql("SELECT partition, instance_id, token, releasing, wanted_by FROM partition_leases "
                        "ORDER BY partition")
        assert {r["partition"]: Lease(r["instance_id"], r["token"], r["releasing"], r["wanted_by"])
                for r in rows} == self.leases
        tasks = self.sql("SELECT id, key_type, key_id, partition, state, claimed_by, time_started, time_ended "
                         "FROM tasks ORDER BY id")
        assert {r["id"]: (OrderingKey(r["key_type"], r["key_id"]), r["state"], r["claimed_by"]) for r in tasks} == {
            tid: (t.key, t.state, t.claimed_by) for tid, t in self.tasks.items()}
        by_key: dict[OrderingKey, list[Row]] = {}
        for r in tasks:
            key = OrderingKey(r["key_type"], r["key_id"])
            assert r["partition"] == partition_of(key, P), r
            if r["state"] in ("queued", "running") and r["claimed_by"] is not None:
                holder = self.leases[r["partition"]].instance
                assert r["claimed_by"] == holder, f"task {r['id']} claimed by {r['claimed_by']}, partition by {holder}"
            by_key.setdefault(key, []).append(r)
        for key, key_rows in by_key.items():
            states = "".join("e" if r["state"] in TERMINAL else "r" if r["state"] == "running"
                             else "c" if r["claimed_by"] is not None else "u" for r in key_rows)
            assert re.fullmatch("e*r?c*u*", states), f"{key}: states in id order {states}"
            started = [r for r in key_rows if r["state"] != "queued"]
            for a, b in pairwise(started):
                assert a["time_ended"] is not None and a["time_ended"] < b["time_started"], (key, a["id"], b["id"])
        for i in self.ids("up"):  # a live instance's partitions cannot have been taken
            h = self.hosts[i]
            for p, token in h.held.items():
                assert self.current(h.instance, p, token), (h.instance, p, token, self.leases[p])

    @invariant()
    def only_the_holder_writes(self) -> None:
        for p in KEY_PARTITIONS:
            assert self.tokens[p] == sorted(set(self.tokens[p])), self.tokens[p]
            tids = sorted(tid for tid, t in self.tasks.items() if t.partition == p)
            for instance in sorted(self.holders[p]):
                for token in self.tokens[p]:
                    current = self.current(instance, p, token)
                    held = {p: token}
                    assert (self.admin.all("hold_partitions", instance_id=instance, starting=False,
                                           partitions=[p], tokens=[token]) != []) == current
                    startable = sorted(t for t in tids if self.tasks[t].state == "queued"
                                       and self.tasks[t].claimed_by == instance)
                    endable = sorted(t for t in tids if self.tasks[t].state == "running"
                                     and self.tasks[t].claimed_by == instance)
                    try:
                        started = dbp.mark_running_fenced(self.probe, instance, held, tids, 0, self.stamp())
                        self.probe.rollback()
                        ended = dbp.record_outcomes_fenced(self.probe, instance, held, [
                            dbp.Outcome(t, "finished", None, None, self.stamp()) for t in tids])
                    finally:
                        self.probe.rollback()
                    can_start = current and not self.leases[p].releasing
                    assert started == (startable if can_start else []), (p, instance, token, started)
                    assert ended == (endable if current else []), (p, instance, token, ended)

    # -- the end: everyone recovers and drains the queue ------------------------------------------
    def drain(self) -> None:
        for i in self.ids("paused"):
            self.resume_host(i)
        for i in self.ids("down"):
            self.join_host(i)
        self.tick(LEASE)
        verdicts = iter(VERDICTS * (len(self.tasks) + 1))
        for _ in range(len(self.tasks) + 4):
            for h in self.hosts:
                self.rebalance_for(h)
                self.claim_for(h, len(self.tasks) + 1, len(self.tasks) + 1)
                for _, tid in [(j, t) for j, t in self.writable() if self.hosts[j] is h]:
                    while tid is not None:
                        local = h.local[tid]
                        how = {"queued": "start", "running": "finished", "adopted": next(verdicts)}[local]
                        assert self.write(h, tid, how)
                        tid = self.next_task(h, self.tasks[tid].key)
                self.finish_release_for(h)
                self.database_agrees()
            if all(t.state in TERMINAL for t in self.tasks.values()):
                break
        for tid, task in self.tasks.items():
            assert task.state in TERMINAL and task.ends == 1, f"task {tid}: {task}"
        self.only_the_holder_writes()

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is None:
                self.drain()
        finally:
            for h in self.hosts:
                h.store.rollback()


@pytest.fixture
def conns(dsn: str) -> Iterator[Connections]:
    with protocol_connections(dsn, HOSTS, "partition-protocol-test") as opened:
        yield opened


def test_partition_protocol(conns: Connections) -> None:
    class Machine(PartitionProtocol):
        def __init__(self) -> None:
            super().__init__(conns)

    run_state_machine_as_test(Machine, settings=settings(max_examples=50, stateful_step_count=40, deadline=None))


def test_a_join_hands_partitions_over_cooperatively(conns: Connections) -> None:
    """One instance holds everything, a task of a key running and two more queued behind it; a
    second joins: the first gives up half, the key's partition among them: no more starts there,
    its unstarted tasks go back to the queue (keeping their place), the partition stays its own
    until the running task ends, then it is freed; the second acquires it with a higher token and
    runs the key's remaining tasks in order."""
    key = next(k for k in KEYS if partition_of(k, P) >= P // 2)  # in the half the first instance gives up
    p = partition_of(key, P)
    machine = PartitionProtocol(conns)
    try:
        machine.start_up(hosts=1, keys=[key, key, key])
        first = machine.hosts[0]
        machine.rebalance_for(first)
        assert len(first.held) == P
        old = first.held[p]
        machine.claim_for(first, 3, 3)
        running = min(first.local)
        assert machine.write(first, running, "start")
        machine.join(0)
        second = machine.hosts[1]
        machine.rebalance_for(second)  # reserves half
        assert sum(lease.wanted == second.instance for lease in machine.leases.values()) == P // 2
        machine.rebalance_for(first)  # begins handing half over
        assert machine.leases[p].releasing and sorted(first.local) == [running]  # the other two went back
        machine.finish_release_for(first)
        assert machine.leases[p].instance == first.instance  # kept: its task still runs
        machine.rebalance_for(second)
        assert p not in second.held
        assert machine.write(first, running, "finished")
        machine.finish_release_for(first)
        assert machine.leases[p].instance is None and machine.leases[p].wanted == second.instance
        machine.rebalance_for(second)
        assert second.held[p] > old and len(first.held) == len(second.held) == P // 2
        machine.claim_for(second, 3, 3)
        for tid in sorted(second.local):
            assert machine.write(second, tid, "start") and machine.write(second, tid, "finished")
        machine.database_agrees()
        machine.only_the_holder_writes()
    finally:
        machine.teardown()


def test_a_stale_token_of_the_same_instance_writes_nothing(conns: Connections) -> None:
    """An instance hands a partition over and later gets it back: its writes under the old
    token (a shard that missed the hand-over) are refused, those under the new one go through."""
    key = next(k for k in KEYS if partition_of(k, P) >= P // 2)  # in the half the first instance gives up
    p = partition_of(key, P)
    machine = PartitionProtocol(conns)
    try:
        machine.start_up(hosts=1, keys=[key, key, key])
        first = machine.hosts[0]
        machine.rebalance_for(first)
        old = first.held[p]
        machine.join(0)
        second = machine.hosts[1]
        machine.rebalance_for(second)  # reserves the upper half
        machine.rebalance_for(first)  # starts handing it over
        machine.finish_release_for(first)
        machine.rebalance_for(second)
        assert p in second.held and p not in first.held
        machine.claim_for(second, 1, 1)
        machine.write(second, min(second.local), "start")
        machine.write(second, min(second.local), "finished")
        machine.leave_host(1, rejoin=False)  # p is free again; the first instance takes it back
        machine.rebalance_for(first)
        assert p in first.held and machine.leases[p].token > old
        machine.claim_for(first, 1, 1)
        tid = min(first.local)
        assert first.instance is not None
        with first.store.transaction():
            assert dbp.mark_running_fenced(first.store, first.instance, {p: old}, [tid], 0, machine.stamp()) == []
            assert dbp.hold_partitions(first.store, first.instance, {p: old}, starting=False) == set()
        machine.only_the_holder_writes()
        assert machine.write(first, tid, "start")
    finally:
        machine.teardown()


def test_a_claim_committed_late_is_not_stranded_by_a_takeover(conns: Connections) -> None:
    """An instance claims tasks of its partition with its lease live, then stalls past its lease
    before COMMIT while another instance takes its partitions over. The claim holds the lease rows
    (shared) to the end of its transaction, so the takeover passes those partitions by (SKIP
    LOCKED) instead of taking it without the claimed tasks, which it could not see: they would be
    stranded, claimed by an instance that no longer holds their partition. Once the stalled claim
    commits, the next takeover takes the partition with them."""
    key = KEYS[0]
    p = partition_of(key, P)
    machine = PartitionProtocol(conns)
    try:
        machine.start_up(hosts=2, keys=[key, key])
        first, second = machine.hosts[0], machine.hosts[1]
        machine.rebalance_for(first)
        machine.rebalance_for(second)
        holder, taker = (first, second) if p in first.held else (second, first)
        assert holder.instance is not None
        with holder.store.transaction():
            got = dbp.claim_partition_tasks(holder.store, holder.instance, holder.held, 2, 2)
            assert len(got) == 2
            holder.status = "paused"
            machine.tick(LEASE)
            # The claim locked the lease rows of every partition it claimed from (all it holds).
            machine.rebalance_for(taker, locked=frozenset(holder.held))
            assert machine.leases[p].instance == holder.instance
        for r in got:
            machine.tasks[r["id"]].claimed_by = holder.instance
            holder.local[r["id"]] = "queued"
        machine.database_agrees()
        machine.forget(holder)  # it never comes back
        machine.rebalance_for(taker)
        assert p in taker.held and sorted(taker.local) == sorted(r["id"] for r in got)  # adopted
        machine.database_agrees()
    finally:
        machine.teardown()
