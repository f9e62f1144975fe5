"""Per-key order through the real Dispatcher, under shard deaths, broken
channels, fetcher restarts, parked tasks and drains.

The simulation plays

* the fetcher: claims the oldest unclaimed queued tasks once it has adopted
  what it holds, routes them, sends each connected slot what
  ``take_sendable`` gives it (one ``Run`` per call), reads ``Ended`` /
  ``Performed`` / ``Deferred`` / ``Drained``, resyncs a slot whose shard says Hello like
  ``Fetcher._resync`` (``shard_connected``, read the lost tasks' states, then
  ``requeue``) and, after a restart, adopts the database's held tasks like
  ``Fetcher._adopt_held`` (running ones forced to their ``run_by_shard`` slot,
  as ``_settling_slot`` does) once every shard is back, or earlier
  (``STARTUP_WAIT``);
* the shards: a local queue in the order it was sent; a shard may start the
  first task of several different keys of its queue at once (a batch; never a
  key's later task before an earlier one), performs them one after another,
  says ``Performed`` for each or not (``Execution._say_performed`` skips it
  when the shard has work queued) and holds its outcome until the next batch
  starts or it falls idle (then ``Ended``), may park a key (retry backoff:
  its later tasks are held behind it and reported ``Deferred``), and drops
  what has not started when it loses the
  fetcher (``Shard._lost_fetcher``) but finishes the batch it performs; it
  says Hello only between batches and holds nothing then; a task whose
  database state does not allow it is skipped, as ``mark_running`` /
  ``record_outcome`` refuse it (``Shard._not_started``);
* the database: task states, who claimed them, which slot marked them running.

Messages in flight between them are lost when a channel breaks. Properties:

(a) per key, tasks start in id order (each start is of the key's first
    unfinished task) and never two at once across all slots;
(b) every task ends exactly once, in submission order per key, and in the
    end every task has ended (nothing is lost across deaths and restarts);
(c) while a key has tasks in flight, they are all in one slot, the one
    ``Dispatcher.pinned`` names; a key's tasks physically sit in at most one
    slot, the one it is pinned to if the fetcher knows the key; every claimed
    unfinished task is in the fetcher's hands once it has adopted.

The ``test_the_simulation_catches_*`` tests check the checks: Dispatchers broken
on purpose must fail them.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskomatic.model import OrderingKey, TaskRow, key_of
from taskomatic.runtime.dispatch import Dispatcher
from taskomatic.runtime.router import ROUTINGS, make_routing

KINDS = ("Vm", "StoragePool")
SECONDS = {"quick": 0.001, "slow": 1.0}  # what each action takes: quick ones go out many at a time


def action_of(task_id: int) -> str:
    return "slow" if task_id % 3 == 0 else "quick"


@dataclass
class ShardProc:
    """One shard process in a slot."""

    alive: bool = True
    queue: deque[TaskRow] = field(default_factory=deque)
    running: list[TaskRow] = field(default_factory=list)  # the batch it performs, committed 'running'
    pending: list[TaskRow] = field(default_factory=list)  # performed, outcome held for the next commit
    parked: dict[OrderingKey, list[TaskRow]] = field(default_factory=dict)  # a parked head and those behind it


@dataclass
class Link:
    """The channel between the fetcher and a slot's shard, with messages in flight."""

    up: bool = False
    to_shard: deque[tuple[TaskRow, ...]] = field(default_factory=deque)  # Run messages
    # ended / skipped / performed / deferred / drained
    to_fetcher: deque[tuple[str, tuple[int, ...]]] = field(default_factory=deque)


class Violation(AssertionError):
    pass


DispatcherFactory = Callable[..., Dispatcher]  # (shards, window_max=...) -> Dispatcher


class Pipeline:
    def __init__(self, keys: list[OrderingKey], shards: int, window_max: int,
                 dispatcher: DispatcherFactory = Dispatcher) -> None:
        self.shards = shards
        self.window_max = window_max
        self.dispatcher = dispatcher
        self.tasks = [
            TaskRow(id=i, target_type=k.kind, target_id=k.ident, action=action_of(i), args={},
                    key_type=k.kind, key_id=k.ident, state="queued")
            for i, k in enumerate(keys, start=1)
        ]
        self.by_id = {t.id: t for t in self.tasks}
        self.db: dict[int, str] = {t.id: "queued" for t in self.tasks}
        self.run_by: dict[int, int] = {}
        self.claimed: set[int] = set()
        self.submitted: dict[OrderingKey, list[int]] = {}
        for t in self.tasks:
            self.submitted.setdefault(key_of(t), []).append(t.id)
        self.ended: dict[OrderingKey, list[int]] = {k: [] for k in self.submitted}
        self.started: dict[OrderingKey, list[int]] = {k: [] for k in self.submitted}
        self.procs = [ShardProc() for _ in range(shards)]
        self.links = [Link() for _ in range(shards)]
        self.dispatch = self.dispatcher(shards, window_max=window_max)
        self.adopted = False
        for slot in range(shards):
            self.connect(slot)

    # -- fetcher --------------------------------------------------------------------
    def claim(self, count: int) -> bool:
        if not self.adopted:
            return False  # the fetcher claims only once it has adopted what it holds
        free = [i for i in sorted(self.db) if self.db[i] == "queued" and i not in self.claimed][:count]
        for task_id in free:
            self.claimed.add(task_id)
            self.dispatch.route(self.by_id[task_id])
        return bool(free)

    def send(self, slot: int) -> bool:
        link = self.links[slot]
        if not link.up:
            return False
        batch = self.dispatch.take_sendable(slot)
        if batch:
            link.to_shard.append(tuple(batch))
        return bool(batch)

    def send_fail(self, slot: int, fetcher_reads: int) -> None:
        """Sending a Run fails: it is not delivered, and the channel is closed."""
        if not self.links[slot].up:
            return
        batch = self.dispatch.take_sendable(slot)
        if batch:
            self.dispatch.unsend(slot, batch)
        self.break_link(slot, fetcher_reads)

    def _read_one(self, slot: int) -> None:
        kind, task_ids = self.links[slot].to_fetcher.popleft()
        if kind in ("ended", "skipped"):
            for task_id in task_ids:
                self.dispatch.ended(slot, task_id)
                if kind == "ended":
                    self.dispatch.learn(self.by_id[task_id].action, SECONDS[self.by_id[task_id].action])
        elif kind == "performed":
            self.dispatch.performed(slot, task_ids)
        elif kind == "deferred":
            self.dispatch.defer(slot, task_ids)
        else:
            self.dispatch.returned(slot, task_ids)

    def fetcher_read(self, slot: int) -> bool:
        link = self.links[slot]
        if not link.up or not link.to_fetcher:
            return False
        while link.to_fetcher:
            self._read_one(slot)
        return True

    def connect(self, slot: int) -> bool:
        """A shard says Hello (holding nothing); the fetcher resyncs the slot like ``Fetcher._resync``."""
        proc, link = self.procs[slot], self.links[slot]
        if link.up:
            return False
        if not proc.alive:
            self.procs[slot] = proc = ShardProc()  # the supervisor respawns the slot
        if proc.running:
            return False  # a shard connects between batches
        assert not proc.queue and not proc.parked
        self._commit(slot, report=False)  # Shard._connect settles the held outcomes first
        lost = self.dispatch.shard_connected(slot)
        again = [replace(self.by_id[i], state=self.db[i]) for i in sorted(lost)
                 if i in self.claimed and self.db[i] in ("queued", "running")]
        self.dispatch.requeue(slot, again)
        link.up = True
        if all(other.up for other in self.links):
            self.adopt()
        return True

    def restart_fetcher(self) -> None:
        for slot in range(self.shards):
            self.break_link(slot, fetcher_reads=0)
        self.dispatch = self.dispatcher(self.shards, window_max=self.window_max)
        self.adopted = False

    def adopt(self) -> bool:
        """``Fetcher._adopt_held``: route every held task no shard has, in id order."""
        if self.adopted:
            return False
        in_hand = self.dispatch.in_hand()
        for task_id in sorted(self.claimed):
            state = self.db[task_id]
            if state in ("queued", "running") and task_id not in in_hand:
                # _settling_slot: a task committed running goes back to the slot that marked it.
                self.dispatch.route(replace(self.by_id[task_id], state=state),
                                    self.run_by[task_id] if state == "running" else None)
        self.adopted = True
        return True

    def drain(self) -> None:
        """SIGTERM: each connected shard finishes its batch and hands back the rest; the fetcher
        releases what has not started and exits; a new fetcher starts."""
        for slot in range(self.shards):
            proc, link = self.procs[slot], self.links[slot]
            if not link.up:
                continue
            if proc.alive:
                self.receive(slot)
                while self.end(slot):
                    pass
                returned = [t.id for t in proc.queue] + [t.id for ts in proc.parked.values() for t in ts]
                link.to_fetcher.append(("drained", tuple(returned)))
                self.procs[slot] = ShardProc(alive=False)  # it exits
            self.fetcher_read(slot)
        for task_id in sorted(self.claimed):
            if self.db[task_id] == "queued":
                self.claimed.discard(task_id)  # release_unstarted
        self.restart_fetcher()

    # -- channel --------------------------------------------------------------------
    def break_link(self, slot: int, fetcher_reads: int) -> None:
        """The channel breaks: the fetcher has read a prefix of what the shard sent, the rest is lost.
        The shard drops what has not started (``_lost_fetcher``); it finishes its batch."""
        link, proc = self.links[slot], self.procs[slot]
        if not link.up:
            return
        for _ in range(min(fetcher_reads, len(link.to_fetcher))):
            self._read_one(slot)
        link.to_shard.clear()
        link.to_fetcher.clear()
        link.up = False
        self.dispatch.shard_gone(slot)  # the fetcher saw the channel close
        proc.queue.clear()
        proc.parked.clear()

    # -- shard ------------------------------------------------------------------------
    def receive(self, slot: int) -> bool:
        proc, link = self.procs[slot], self.links[slot]
        if not (link.up and proc.alive and link.to_shard):
            return False
        while link.to_shard:
            proc.queue.extend(link.to_shard.popleft())
        return True

    def _report(self, slot: int, kind: str, task_ids: tuple[int, ...]) -> None:
        if self.links[slot].up:
            self.links[slot].to_fetcher.append((kind, task_ids))

    def _hold_parked(self, slot: int) -> None:
        """A parked key's tasks reaching the shard wait behind its head (``hold_behind``)."""
        proc = self.procs[slot]
        for t in [t for t in proc.queue if key_of(t) in proc.parked]:
            proc.queue.remove(t)
            proc.parked[key_of(t)].append(t)
            self._report(slot, "deferred", (t.id,))

    def start(self, slot: int, choice: int = 0) -> bool:
        """Start a batch: the first queued task of some different keys (``choice`` picks which)."""
        proc = self.procs[slot]
        if not proc.alive or proc.running or not proc.queue:
            return False
        self._commit(slot)  # a batch starts in the transaction that writes the held outcomes
        self._hold_parked(slot)
        firsts: dict[OrderingKey, TaskRow] = {}
        for t in proc.queue:
            firsts.setdefault(key_of(t), t)
        candidates = list(firsts.values())
        if not candidates:
            return True
        batch = [t for n, t in enumerate(candidates) if n == 0 or choice >> n & 1]
        for task in batch:
            proc.queue.remove(task)
            self._start_one(slot, task)
        return True

    def _start_one(self, slot: int, task: TaskRow) -> None:
        state, ours = self.db[task.id], task.id in self.claimed
        if task.state == "queued" and state == "queued" and ours:
            pass  # mark_running
        elif state == "running" and ours and (task.state == "running" or self.run_by[task.id] == slot):
            task = replace(task, state="running")  # reconcile (a queued copy: only the slot that marked it)
        else:
            self._report(slot, "skipped", (task.id,))  # refused
            return
        key = key_of(task)
        unfinished = [i for i in self.submitted[key] if self.db[i] != "finished"]
        if unfinished[0] != task.id:
            raise Violation(f"{key}: task {task.id} starts in slot {slot} while earlier task {unfinished[0]} "
                            "has not ended")
        for other, other_proc in enumerate(self.procs):
            if not other_proc.alive:
                continue
            busy = [t for t in [*other_proc.running, *other_proc.pending] if key_of(t) == key]
            busy += [t for t in other_proc.parked.get(key, ()) if self.db[t.id] == "running"]
            if busy:
                raise Violation(f"{key}: task {task.id} starts in slot {slot} while task {busy[0].id} "
                                f"runs in slot {other}")
        self.db[task.id] = "running"
        self.run_by[task.id] = slot
        self.started[key].append(task.id)
        self.procs[slot].running.append(task)

    def perform(self, slot: int, say: bool = True) -> bool:
        """The batch's next task runs; its outcome is held, and the fetcher told ``Performed`` if ``say``."""
        proc = self.procs[slot]
        if not proc.alive or not proc.running:
            return False
        task = proc.running.pop(0)
        proc.pending.append(task)
        if say:
            self._report(slot, "performed", (task.id,))
        return True

    def _commit(self, slot: int, report: bool = True) -> None:
        """Write the held outcomes (one transaction), then say ``Ended``."""
        proc = self.procs[slot]
        for task in proc.pending:
            if self.db[task.id] != "running":
                raise Violation(f"task {task.id} ends from state {self.db[task.id]}")
            self.db[task.id] = "finished"
            self.ended[key_of(task)].append(task.id)
        if proc.pending and report:
            self._report(slot, "ended", tuple(t.id for t in proc.pending))
        proc.pending.clear()

    def end(self, slot: int) -> bool:
        """Commit the held outcomes (falling idle, or with the next start), or perform and commit the next."""
        proc = self.procs[slot]
        if not proc.alive or not (proc.pending or proc.running):
            return False
        if not proc.pending:
            self.perform(slot)
        self._commit(slot)
        return True

    def park(self, slot: int, which: int) -> bool:
        """A transient failure: the key waits for a retry, its later tasks behind it."""
        proc = self.procs[slot]
        if not proc.alive or not self.links[slot].up:
            return False  # a shard that lost the fetcher has nothing unstarted; its batch just ends
        if proc.running and which % 2:
            task = replace(proc.running.pop(0), state="running")  # failed after it started
        else:
            firsts = [t for t in proc.queue if key_of(t) not in proc.parked]
            if not firsts:
                return False
            task = firsts[0]  # failed before it started: still queued
            proc.queue.remove(task)
        proc.parked[key_of(task)] = [task]
        self._report(slot, "deferred", (task.id,))
        return True

    def wake(self, slot: int, which: int) -> bool:
        proc = self.procs[slot]
        if not proc.alive or not proc.parked:
            return False
        key = sorted(proc.parked)[which % len(proc.parked)]
        proc.queue.extendleft(reversed(proc.parked.pop(key)))
        return True

    def kill(self, slot: int, fetcher_reads: int = 0) -> None:
        """The shard process dies: all it had is gone (the database keeps 'running')."""
        proc = self.procs[slot]
        if not proc.alive:
            return
        self.break_link(slot, fetcher_reads)
        self.procs[slot] = ShardProc(alive=False)

    def step(self, slot: int, b: int) -> None:
        """The next natural move of one slot's pipeline."""
        proc = self.procs[slot]
        (self.send(slot) or self.receive(slot) or (b % 2 == 1 and self.perform(slot, say=b % 4 == 3)) or self.end(slot)
         or self.start(slot, b)
         or self.fetcher_read(slot) or self.connect(slot) or (b % 4 == 0 and self.wake(slot, b))
         or self.adopt() or self.claim(1 + b % 8) or (proc.alive and self.wake(slot, b)))

    # -- properties ---------------------------------------------------------------------
    def check_placement(self) -> None:
        d = self.dispatch
        for key, count in d.in_flight.items():
            holding = [s.index for s in d.slots for t, _ in s.sent.values() if key_of(t) == key]
            if len(holding) != count or set(holding) != {d.pinned.get(key)}:
                raise Violation(f"{key} in flight in slots {holding}, pinned to {d.pinned.get(key)}")
        self.check_chains()
        for slot_queue in d.slots:
            for key in slot_queue.pinned_waiting:
                if d.pinned.get(key) != slot_queue.index or not d.waiting.get(key):
                    raise Violation(f"{key} waits for slot {slot_queue.index} but is pinned to {d.pinned.get(key)}")
        for key, queue in d.waiting.items():
            waiting = [t.id for t in queue]
            sent = [i for s in d.slots for i, (t, _) in s.sent.items() if key_of(t) == key]
            if waiting != sorted(waiting) or (sent and max(sent) > waiting[0]):
                raise Violation(f"{key}: waiting {waiting} out of order (in flight: {sent})")
            lanes = [i for i, lane in enumerate(d.homed_keys) if key in lane] + [None] * (key in d.free_keys)
            if bool(lanes) == (key in d.pinned) or len(lanes) > 1:
                raise Violation(f"{key} has waiting tasks and is both or neither free and pinned (lanes {lanes})")
            if lanes and lanes[0] != d.routing.home(key):
                raise Violation(f"{key} waits in lane {lanes[0]}, its home is {d.routing.home(key)}")
        where: dict[OrderingKey, set[int]] = {}
        for slot in range(self.shards):
            proc, link = self.procs[slot], self.links[slot]
            sitting = [t for run in link.to_shard for t in run]
            if proc.alive:
                sitting += [*proc.queue, *proc.running, *proc.pending, *(t for ts in proc.parked.values() for t in ts)]
            for t in sitting:
                where.setdefault(key_of(t), set()).add(slot)
        for key, slots in where.items():
            if len(slots) > 1:
                raise Violation(f"tasks of {key} sit in slots {sorted(slots)}")
            known = key in d.waiting or key in d.pinned
            if known and {d.pinned.get(key)} != slots:
                raise Violation(f"tasks of {key} sit in slot {slots}, the fetcher pins it to {d.pinned.get(key)}")
        in_hand = d.in_hand()
        unfinished = {i for i in self.claimed if self.db[i] != "finished"}
        if self.adopted and not unfinished <= in_hand:
            raise Violation(f"claimed unfinished tasks the fetcher lost track of: {sorted(unfinished - in_hand)}")
        if not in_hand <= self.claimed:
            raise Violation(f"fetcher holds unclaimed tasks: {sorted(in_hand - self.claimed)}")

    def check_chains(self) -> None:
        """The dispatcher's chains are exactly the keys with chain_depth tasks waiting."""
        d = self.dispatch
        expected = {k for k, q in d.waiting.items() if len(q) >= d.chain_depth}
        if d.chains != expected:
            raise Violation(f"chains {d.chains} but keys waiting deep enough: {expected}")

    def check_order(self) -> None:
        for key, done in self.ended.items():
            if done != self.submitted[key][:len(done)]:
                raise Violation(f"{key}: ended {done}, submitted {self.submitted[key]}")

    def finish(self) -> None:
        """Everything recovers; run until every task has ended."""
        for _ in range(4 * len(self.tasks) + 20):
            if all(state == "finished" for state in self.db.values()):
                return
            for slot in range(self.shards):
                if not self.links[slot].up:
                    while self.end(slot):
                        pass
                    self.connect(slot)
            self.adopt()
            self.claim(len(self.tasks))
            for slot in range(self.shards):
                while self.wake(slot, 0):
                    pass
                self.send(slot)
                self.receive(slot)
                while self.end(slot) or self.start(slot, -1):
                    pass
                self.fetcher_read(slot)
                self.check_placement()
                self.check_order()
        stuck = sorted(i for i, s in self.db.items() if s != "finished")
        raise Violation(f"tasks never ended: {stuck}")


# Weights: mostly work ("step" advances one slot by its next natural move), now and then a failure.
SHARD_FAILURE_OPS = (
    *["step"] * 12, "claim", "claim", "send", "receive", "start", "perform", "end", "fetcher_read", "park", "wake",
    "send_fail", "kill", "kill", "break", "reconnect", "reconnect",
)
OP_STRATEGY = st.sampled_from(SHARD_FAILURE_OPS)
# Adds fetcher restarts and drains; "adopt" may come before every shard is back (Fetcher.STARTUP_WAIT).
RESTART_OP_STRATEGY = st.sampled_from((*SHARD_FAILURE_OPS, "restart_fetcher", "adopt", "adopt", "drain"))

keys_strategy = st.builds(OrderingKey, st.sampled_from(KINDS), st.integers(1, 4))


def busy_slots(sim: Pipeline) -> list[int]:
    """Slots with something going on, so that operations land where they matter."""
    busy = []
    for slot in range(sim.shards):
        queue, link, proc = sim.dispatch.slots[slot], sim.links[slot], sim.procs[slot]
        if (queue.pinned_waiting or queue.sent or link.to_shard or link.to_fetcher or not link.up
                or proc.queue or proc.running or proc.pending or proc.parked):
            busy.append(slot)
    return busy


def apply(sim: Pipeline, op: str, a: int, b: int) -> None:
    busy = busy_slots(sim)
    slot = busy[a % len(busy)] if busy and a < 4 else a % sim.shards
    if op == "step":
        sim.step(slot, b)
    elif op == "claim":
        sim.claim(1 + b % 5)
    elif op == "send":
        sim.send(slot)
    elif op == "send_fail":
        sim.send_fail(slot, fetcher_reads=b % 3)
    elif op == "receive":
        sim.receive(slot)
    elif op == "start":
        sim.start(slot, b)
    elif op == "perform":
        sim.perform(slot, say=b % 2 == 0)
    elif op == "end":
        sim.end(slot)
    elif op == "fetcher_read":
        sim.fetcher_read(slot)
    elif op == "park":
        sim.park(slot, b)
    elif op == "wake":
        sim.wake(slot, b)
    elif op == "kill":
        sim.kill(slot, fetcher_reads=b % 3)
    elif op == "break":
        sim.break_link(slot, fetcher_reads=b % 3)
    elif op == "reconnect":
        sim.connect(slot)
    elif op == "restart_fetcher":
        sim.restart_fetcher()
    elif op == "adopt":
        sim.adopt()
    elif op == "drain":
        sim.drain()
    else:  # pragma: no cover
        raise AssertionError(op)


def routed(routing: str) -> DispatcherFactory:
    """A Dispatcher with the routing a ``routing`` setting names (both must keep per-key order). A key
    with three tasks waiting is a chain here, so the examples' few tasks per key exercise chains too."""
    def make(shards: int, window_max: int) -> Dispatcher:
        return Dispatcher(shards, window_max=window_max, routing=make_routing(routing, shards), chain_depth=3)

    return make


def run(keys: list[OrderingKey], shards: int, window_max: int, ops: list[tuple[str, int, int]],
        dispatcher: DispatcherFactory = Dispatcher) -> Pipeline:
    sim = Pipeline(keys, shards, window_max, dispatcher)
    for op, a, b in ops:
        apply(sim, op, a, b)
        sim.check_placement()
        sim.check_order()
    sim.finish()
    sim.check_order()
    for key, ids in sim.submitted.items():
        assert sim.ended[key] == ids, (key, sim.ended[key], ids)
    return sim


op_lists = st.lists(st.tuples(OP_STRATEGY, st.integers(0, 7), st.integers(0, 15)), min_size=20, max_size=150)


@pytest.mark.parametrize("routing", ROUTINGS)
@settings(max_examples=800)
@given(keys=st.lists(keys_strategy, min_size=3, max_size=30), shards=st.integers(1, 4),
       window_max=st.integers(2, 8), ops=op_lists)
@pytest.mark.slow
def test_per_key_order_survives_shard_failures(routing: str, keys: list[OrderingKey], shards: int, window_max: int,
                                               ops: list[tuple[str, int, int]]) -> None:
    run(keys, shards, window_max, ops, routed(routing))


@pytest.mark.parametrize("routing", ROUTINGS)
@settings(max_examples=400)
@given(
    keys=st.lists(keys_strategy, min_size=1, max_size=30), shards=st.integers(1, 4), window_max=st.integers(2, 8),
    ops=st.lists(st.tuples(st.sampled_from(("step", "claim", "send", "receive", "start", "perform", "end",
                                            "fetcher_read")),
                           st.integers(0, 7), st.integers(0, 15)), max_size=80),
)
def test_per_key_order_without_failures(routing: str, keys: list[OrderingKey], shards: int, window_max: int,
                                         ops: list[tuple[str, int, int]]) -> None:
    sim = run(keys, shards, window_max, ops, routed(routing))
    assert all(state == "finished" for state in sim.db.values())
    for key, ids in sim.submitted.items():
        assert sim.started[key] == ids  # nothing ran twice
    if routing == "hash":  # nothing was interrupted: every task ran on its key's home slot
        home = make_routing("hash", shards)
        for task in sim.tasks:
            assert sim.run_by[task.id] == home.home(key_of(task)), (task, sim.run_by[task.id])


@pytest.mark.parametrize("routing", ROUTINGS)
@settings(max_examples=800)
@given(
    keys=st.lists(keys_strategy, min_size=3, max_size=30), shards=st.integers(1, 4), window_max=st.integers(2, 8),
    ops=st.lists(st.tuples(RESTART_OP_STRATEGY, st.integers(0, 7), st.integers(0, 15)), min_size=20,
                 max_size=150),
)
@pytest.mark.slow
def test_per_key_order_survives_fetcher_restarts_and_drains(routing: str, keys: list[OrderingKey], shards: int,
                                                            window_max: int,
                                                            ops: list[tuple[str, int, int]]) -> None:
    run(keys, shards, window_max, ops, routed(routing))


@settings(max_examples=400)
@given(hot=st.integers(6, 24), others=st.lists(keys_strategy, min_size=2, max_size=16), shards=st.integers(2, 4),
       window_max=st.integers(2, 8), order=st.randoms(use_true_random=False),
       ops=st.lists(st.tuples(RESTART_OP_STRATEGY, st.integers(0, 7), st.integers(0, 15)), min_size=20,
                    max_size=150))
@pytest.mark.slow
def test_per_key_order_with_a_hot_key_survives_failures(hot: int, others: list[OrderingKey], shards: int,
                                                       window_max: int, order: random.Random,
                                                       ops: list[tuple[str, int, int]]) -> None:
    """One key with many tasks among few (a chain, as Zipf keys make one): its slot leaves the free keys
    to the others while they have room, and nothing may come out of order for it."""
    keys = [OrderingKey("Vm", 99)] * hot + others
    order.shuffle(keys)
    run(keys, shards, window_max, ops, routed("pinned"))


# -- scenarios ------------------------------------------------------------------------------

A, B = OrderingKey("Vm", 1), OrderingKey("Vm", 2)


def learned(sim: Pipeline) -> Pipeline:
    """The fetcher knows how long each action takes (quick ones go out several at a time)."""
    for action, seconds in SECONDS.items():
        sim.dispatch.learn(action, seconds)
    return sim


def test_interrupted_task_is_reconciled_on_its_slot_before_the_rest_of_its_key() -> None:
    sim = learned(Pipeline([A, A, B, A], shards=2, window_max=8))
    sim.claim(2)
    sim.send(0)
    sim.claim(2)
    sim.receive(0)
    assert [t.id for t in sim.procs[0].queue] == [1, 2]
    sim.start(0)  # task 1 running
    sim.kill(0)
    assert sim.db[1] == "running"
    sim.connect(0)
    assert [t.id for t in sim.dispatch.waiting[A]] == [1, 2, 4]
    assert sim.dispatch.pinned[A] == 0 and sim.dispatch.waiting[A][0].state == "running"
    sim.send(1)
    assert [t.id for t in sim.links[1].to_shard[-1]] == [3]  # A waits for slot 0, B goes to slot 1
    sim.finish()
    assert sim.ended[A] == [1, 2, 4] and sim.ended[B] == [3]
    assert sim.started[A] == [1, 1, 2, 4]  # 1 again: reconciled


def test_a_key_moves_to_another_slot_once_nothing_of_it_is_in_flight() -> None:
    sim = learned(Pipeline([A] * 5, shards=2, window_max=8))
    sim.claim(5)
    sim.send(0)
    sim.receive(0)
    while sim.start(0):
        sim.end(0)
    sim.fetcher_read(0)  # 1, 2 and 3 ended: the key is free
    assert A not in sim.dispatch.pinned
    sim.send(1)
    assert [t.id for t in sim.links[1].to_shard[0]] == [4, 5]  # its next ones, in order, on the other slot
    assert sim.dispatch.pinned == {A: 1}
    sim.finish()
    assert sim.ended[A] == [1, 2, 3, 4, 5]


def test_ended_task_whose_message_was_lost_is_not_rerun() -> None:
    sim = learned(Pipeline([A] * 3, shards=1, window_max=8))
    sim.claim(3)
    sim.send(0)
    sim.receive(0)
    sim.start(0)
    sim.end(0)  # task 1 finished; its Ended never reaches the fetcher
    sim.kill(0, fetcher_reads=0)
    sim.connect(0)
    assert [t.id for t in sim.dispatch.waiting[A]] == [2, 3]
    sim.finish()
    assert sim.ended[A] == [1, 2, 3]
    assert sim.started[A] == [1, 2, 3]


def test_fetcher_restart_while_a_shard_performs_a_batch() -> None:
    sim = learned(Pipeline([A, B, A, B], shards=2, window_max=8))
    sim.claim(2)
    sim.send(0)
    sim.claim(2)  # pinned behind 1 and 2
    sim.receive(0)
    sim.start(0, choice=-1)  # 1 (A) and 2 (B) in one batch
    assert [t.id for t in sim.procs[0].running] == [1, 2]
    sim.restart_fetcher()  # slot 0's shard drops 3 and 4, goes on with 1 and 2
    sim.connect(1)
    sim.adopt()  # STARTUP_WAIT: slot 0's shard is still busy
    assert sim.dispatch.pinned == {A: 0, B: 0}  # 1 and 2 are running there: only it may settle them
    assert not sim.send(1)
    sim.end(0)
    sim.end(0)
    sim.connect(0)
    sim.finish()
    assert sim.ended == {A: [1, 3], B: [2, 4]}


def test_drain_hands_back_and_a_new_fetcher_claims_again() -> None:
    sim = Pipeline([A, A, B, B], shards=1, window_max=8)
    sim.claim(4)
    sim.send(0)
    sim.receive(0)
    sim.start(0)
    sim.park(0, 1)  # task 1 started, then parked for a retry: it stays 'running'
    sim.fetcher_read(0)
    sim.drain()
    assert sim.db[1] == "running" and sim.claimed == {1}
    sim.finish()
    assert sim.ended == {A: [1, 2], B: [3, 4]}


# -- the simulation catches broken dispatchers ---------------------------------------------


class RequeuesAtTheBack(Dispatcher):
    def requeue(self, index: int, tasks: list[TaskRow]) -> None:
        for task in sorted(tasks, key=lambda t: t.id):
            self.route(task, index if task.state == "running" else None)


class FreesAKeyTooSoon(Dispatcher):
    """Frees a key when one of its tasks ends, though others may still be in flight."""

    def _left_flight(self, key: OrderingKey) -> None:
        self.in_flight[key] -= 1
        if self.in_flight[key] <= 0:
            del self.in_flight[key]
        slot = self.pinned.pop(key, None)
        if slot is not None:
            self.slots[slot].pinned_waiting.pop(key, None)
        if key in self.waiting:
            self.free_keys[key] = None
            self.free_keys.move_to_end(key, last=False)


class IgnoresTheSettlingSlot(Dispatcher):
    def route(self, task: TaskRow, slot: int | None = None) -> None:
        super().route(task, None)

    def requeue(self, index: int, tasks: list[TaskRow]) -> None:
        super().requeue(index, [replace(t, state="queued") for t in tasks])


def test_the_simulation_catches_a_reordering_requeue() -> None:
    sim = Pipeline([A] * 4, shards=1, window_max=2, dispatcher=RequeuesAtTheBack)
    sim.claim(2)
    sim.send(0)
    sim.claim(2)
    sim.kill(0)
    sim.connect(0)
    with pytest.raises(Violation):
        sim.finish()


def test_the_simulation_catches_a_key_freed_while_in_flight() -> None:
    sim = learned(Pipeline([A, A, A, A, B], shards=2, window_max=8, dispatcher=FreesAKeyTooSoon))
    sim.claim(5)
    sim.send(0)  # 1, 2 and 3: three of a key in flight
    sim.receive(0)
    sim.start(0)
    sim.end(0)
    sim.fetcher_read(0)  # 1 ended, 2 is still in slot 0: 4 must not go elsewhere
    sim.send(1)
    sim.receive(1)
    assert 4 in [t.id for t in sim.procs[1].queue]
    with pytest.raises(Violation, match="starts in slot 1 while earlier task 2"):
        sim.start(1, choice=-1)


def test_the_simulation_catches_a_task_to_settle_sent_to_another_slot() -> None:
    sim = Pipeline([A, A], shards=2, window_max=8, dispatcher=IgnoresTheSettlingSlot)
    sim.claim(2)
    sim.send(0)
    sim.receive(0)
    sim.start(0)
    sim.restart_fetcher()
    sim.connect(1)
    sim.adopt()  # task 1 still runs in slot 0
    with pytest.raises(Violation):
        sim.send(1)
        sim.receive(1)
        sim.start(1)
