"""Which claimed task goes to which shard, and when: the fetcher's bookkeeping.

Pure logic, no I/O, so the order guarantees can be checked by property tests
without processes.

A key is **pinned** to a shard slot while it has tasks in flight there (sent,
not ended): its next tasks go to that slot too, after them, and the slot
runs what it is sent in order, one at a time. That is the whole per-key
order argument. Once its last task there ended, the key is free again and
goes to whichever slot has room first. So a hot key or a slow action holds
up only its own slot's few sent tasks, never a fixed share of all keys, as
routing by a hash of the key would.

A slot is sent tasks while the work it has in hand is expected to take less
than ``lookahead`` seconds (from what each action took lately), and always
when it has none. Quick tasks go out many at a time (the shard starts them in
batches); a slow one goes out only once the slot's previous task has run
(the shard says ``Performed`` before it commits the outcome, and the next
start carries that commit), so nothing ever waits behind a slow task on one
shard while another shard could run it. A shard with ``LOOKAHEAD`` of work
queued to start, by its own estimates, does not say ``Performed``
(``Execution._say_performed``): the slot would get no room from it, and the
start of that work says ``Ended`` with its commit.

A slot gets its pinned keys' next tasks at once, room or not (they could not
run elsewhere before their predecessors end, and a hot key's chain runs
without gaps), then free keys in the order they got work. At most
``per_key_ahead`` tasks of one key are in flight: the one running, the one the
shard starts with its outcome, and the one after. With only two, every link
of a chain waited for a round trip (the shard's Ended to the fetcher, the next
task back); more would only crowd out other keys' tasks, since a shard starts
one task per key per transaction. Tasks an interrupted
shard had committed ``running`` go back to its slot only (``route(task,
slot)``): only it may settle them.

A **chain** is a key with at least ``chain_depth`` tasks waiting: its tasks can
only run one after another, one commit each, so it is the run's critical path
(a hot VM under Zipf keys). Each of its links waits for its shard's whole batch
of other keys' tasks; so with pinned routing a slot running a chain gets no
free keys while another slot without one has room, and its links follow each
other at the pace of a commit. (Hash routing has no such choice: a key's home
is fixed.) A chain may have ``chain_ahead`` tasks in flight instead of
``per_key_ahead``: with three, the chain's shard ran out of its next link about
two batches in three (a turn of the fetcher's loop under load is slower than a
link), and waited for it; with ten it hardly ever does. Its slot runs little
else, so the extra tasks crowd out nobody.

Which slot a free key goes to is the routing's choice (``router``, chosen at
construction): ``pinned`` (the default) lets any slot with room take it, as
above; ``hash`` gives every key a home slot, its partition mod N, and only
that slot takes it, whatever its load (it still waits for room there).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from taskomatic.model import OrderingKey, TaskRow, key_of
from taskomatic.runtime.router import PinnedRouting, Routing

LOOKAHEAD = 0.005  # seconds of expected work a slot is sent ahead
WINDOW_MAX = 256  # tasks sent ahead at most, however quick
PER_KEY_AHEAD = 3  # tasks of one key in flight at most: the one running and the next two
CHAIN_DEPTH = 32  # tasks waiting that make a key a chain: far more than a key of an even spread has
CHAIN_AHEAD = 10  # tasks of a chain in flight at most: enough that its shard does not wait for the fetcher
ESTIMATE_WEIGHT = 0.2  # of the newest duration in an action's running estimate


@dataclass
class SlotQueue:
    index: int
    # Sent and not ended, in send order, with the work expected of each.
    sent: dict[int, tuple[TaskRow, float]] = field(default_factory=dict)
    # Sent tasks the shard parked (retry backoff, waiting for children): they
    # do not count as work in hand, so a stuck key cannot starve the others.
    deferred: set[int] = field(default_factory=set)
    # Sent tasks that ran, their outcomes not yet committed: in flight, but no work left.
    performed: set[int] = field(default_factory=set)
    work: float = 0.0  # expected seconds of the sent tasks neither deferred nor performed
    # Pinned keys with tasks waiting to be sent here and room under per_key_ahead, oldest first.
    pinned_waiting: OrderedDict[OrderingKey, None] = field(default_factory=OrderedDict)

    @property
    def active(self) -> int:
        return len(self.sent) - len(self.deferred) - len(self.performed)

    def set_aside(self, task_id: int, into: set[int]) -> None:
        """Stop counting a sent task as work in hand (it was parked, or it ran)."""
        entry = self.sent.get(task_id)
        if entry is None or task_id in into:
            return
        if task_id not in self.deferred and task_id not in self.performed:
            self.work = max(0.0, self.work - entry[1])
        self.deferred.discard(task_id)
        self.performed.discard(task_id)
        into.add(task_id)

    def forget(self, task_id: int) -> TaskRow | None:
        """A sent task ended or was lost: drop it and its work; the task, if it was sent."""
        entry = self.sent.pop(task_id, None)
        if entry is None:
            return None
        if task_id in self.deferred or task_id in self.performed:
            self.deferred.discard(task_id)
            self.performed.discard(task_id)
        else:
            self.work = max(0.0, self.work - entry[1])
        return entry[0]


class Dispatcher:
    def __init__(self, shards: int, lookahead: float = LOOKAHEAD, window_max: int = WINDOW_MAX,
                 per_key_ahead: int = PER_KEY_AHEAD, routing: Routing | None = None,
                 chain_depth: int = CHAIN_DEPTH, chain_ahead: int = CHAIN_AHEAD) -> None:
        self.routing: Routing = routing or PinnedRouting()
        self.lookahead = lookahead
        self.window_max = window_max
        self.per_key_ahead = per_key_ahead
        if chain_depth < 1:
            raise ValueError(f"chain_depth must be at least 1, got {chain_depth}")
        self.chain_depth = chain_depth
        self.chain_ahead = max(chain_ahead, per_key_ahead)
        self.chains: set[OrderingKey] = set()  # keys with at least chain_depth tasks waiting
        # Slots whose shard is connected: only those can take the free keys a chain's slot leaves.
        self.online = [False] * shards
        self.slots = [SlotQueue(i) for i in range(shards)]
        self.waiting: dict[OrderingKey, deque[TaskRow]] = {}  # claimed, not sent, in id order
        self.waiting_count = 0  # tasks in ``waiting``: held() is asked every turn of the fetcher's loop
        # Waiting, not pinned: keys any slot may take (pinned routing), and per slot the keys
        # only it may take (hash routing: their home), each in the order they got work.
        self.free_keys: OrderedDict[OrderingKey, None] = OrderedDict()
        self.homed_keys: list[OrderedDict[OrderingKey, None]] = [OrderedDict() for _ in range(shards)]
        self.pinned: dict[OrderingKey, int] = {}
        self.in_flight: Counter[OrderingKey] = Counter()
        self.estimates: dict[str, float] = {}

    # -- what the fetcher holds -----------------------------------------------------
    def held(self) -> int:
        return self.waiting_count + sum(len(s.sent) for s in self.slots)

    def in_hand(self) -> set[int]:
        return {t.id for q in self.waiting.values() for t in q} | {i for s in self.slots for i in s.sent}

    def estimate(self, action: str) -> float:
        # An action not seen yet counts as a whole lookahead: one at a time until it has run.
        return self.estimates.get(action, self.lookahead)

    def learn(self, action: str, seconds: float) -> None:
        old = self.estimates.get(action)
        self.estimates[action] = seconds if old is None else old + ESTIMATE_WEIGHT * (seconds - old)

    # -- claimed tasks in --------------------------------------------------------------
    def route(self, task: TaskRow, slot: int | None = None) -> None:
        """Add a claimed task; a key's tasks must arrive in id order.

        ``slot``: only that slot may run it (a task its shard committed running);
        the key is pinned there until it has nothing left in flight.
        """
        key = key_of(task)
        if slot is not None:
            self._pin(key, slot)
        queue = self.waiting.get(key)
        if queue is None:
            queue = self.waiting[key] = deque()
        queue.append(task)
        self.waiting_count += 1
        if len(queue) >= self.chain_depth:
            self.chains.add(key)
        self._mark_waiting(key)

    def _free_lane(self, key: OrderingKey) -> OrderedDict[OrderingKey, None]:
        """Where the key waits while not pinned: its home slot's lane, or the shared one."""
        home = self.routing.home(key)
        return self.free_keys if home is None else self.homed_keys[home]

    def _pin(self, key: OrderingKey, slot: int) -> None:
        current = self.pinned.get(key)
        if current is not None and current != slot:
            raise ValueError(f"{key} is pinned to slot {current}, not {slot}")
        self.pinned[key] = slot
        self._free_lane(key).pop(key, None)

    def _mark_waiting(self, key: OrderingKey) -> None:
        slot = self.pinned.get(key)
        if slot is None:
            self._free_lane(key).setdefault(key, None)
        elif self.in_flight[key] < self._ahead(key):
            self.slots[slot].pinned_waiting.setdefault(key, None)

    def _ahead(self, key: OrderingKey) -> int:
        """How many of the key's tasks may be in flight (sent, not ended)."""
        return self.chain_ahead if key in self.chains else self.per_key_ahead

    # -- tasks out to a slot ------------------------------------------------------------
    def has_room(self, index: int) -> bool:
        slot = self.slots[index]
        active = slot.active
        return active == 0 or (active < self.window_max and slot.work < self.lookahead)

    def chain_slots(self) -> set[int]:
        """The slots running a chain (one of its tasks in flight there)."""
        return {slot for slot in (self.pinned.get(key) for key in self.chains) if slot is not None}

    def leaves_free_keys(self, index: int) -> bool:
        """The slot runs a chain, is busy with it, and another slot without one has room: the shared
        free keys are that slot's. (Only the shared lane: a key homed here by hash routing has nowhere
        else to go. And not while all the slot has is parked: it would sit idle.)"""
        if not self.chains or self.slots[index].active == 0:
            return False
        chained = self.chain_slots()
        if index not in chained:
            return False
        return any(j != index and j not in chained and self.online[j] and self.has_room(j)
                   for j in range(len(self.slots)))

    def take_sendable(self, index: int) -> list[TaskRow]:
        """The tasks to send to a slot now, in order; they count as sent.

        A pinned key's next task goes at once, room or not: it cannot run
        anywhere else before its predecessor here ends, so it delays nobody,
        and the shard starts it (and commits its predecessor's outcome) without
        waiting for a round trip. A free key needs room.
        """
        slot = self.slots[index]
        out: list[TaskRow] = []
        while True:
            key = next(iter(slot.pinned_waiting), None)
            if key is None:
                if not self.has_room(index):
                    break
                lane = self.homed_keys[index]
                if not lane:
                    if not self.free_keys or self.leaves_free_keys(index):
                        break
                    lane = self.free_keys
                key = next(iter(lane), None)
                if key is None:
                    break
                del lane[key]
                self.pinned[key] = index
            queue = self.waiting[key]
            task = queue.popleft()
            self.waiting_count -= 1
            if len(queue) < self.chain_depth:
                self.chains.discard(key)
            expected = self.estimate(task.action)
            slot.sent[task.id] = (task, expected)
            slot.work += expected
            self.in_flight[key] += 1
            out.append(task)
            if not queue:
                del self.waiting[key]
            if queue and self.in_flight[key] < self._ahead(key):
                slot.pinned_waiting.setdefault(key, None)
            else:
                slot.pinned_waiting.pop(key, None)
        return out

    def unsend(self, index: int, tasks: list[TaskRow]) -> None:
        """Sending failed: they go back ahead of their keys' other tasks."""
        self._lose(index, [t.id for t in tasks])
        self.requeue(index, tasks)

    def drop_partitions(self, partitions: set[int]) -> list[int]:
        """Forget the waiting (not sent) tasks of these partitions; their ids.

        Multihost hand-over: the database gave them back to the queue, and the
        partition's next holder runs them. What was sent stays: the shard's
        fenced start refuses it and it comes back as ended.
        """
        dropped: list[int] = []
        for key in [k for k, q in self.waiting.items() if q and q[0].partition in partitions]:
            queue = self.waiting.pop(key)
            dropped.extend(t.id for t in queue)
            self.waiting_count -= len(queue)
            self.chains.discard(key)
            self._free_lane(key).pop(key, None)
            slot = self.pinned.get(key)
            if slot is not None:
                self.slots[slot].pinned_waiting.pop(key, None)
        return dropped

    # -- news from a slot -----------------------------------------------------------------
    def ended(self, index: int, task_id: int) -> None:
        task = self.slots[index].forget(task_id)
        if task is not None:
            self._left_flight(key_of(task))

    def _left_flight(self, key: OrderingKey) -> None:
        self.in_flight[key] -= 1
        if self.in_flight[key] > 0:
            if key in self.waiting:
                self._mark_waiting(key)  # room under per_key_ahead again
            return
        del self.in_flight[key]
        slot = self.pinned.pop(key)
        self.slots[slot].pinned_waiting.pop(key, None)
        if key in self.waiting:
            # Free again: its next tasks go to whichever slot has room first, ahead of
            # keys that got work later (a long chain keeps going).
            lane = self._free_lane(key)
            lane[key] = None
            lane.move_to_end(key, last=False)

    def defer(self, index: int, task_ids: tuple[int, ...]) -> None:
        slot = self.slots[index]
        for task_id in task_ids:
            slot.set_aside(task_id, slot.deferred)

    def performed(self, index: int, task_ids: tuple[int, ...]) -> None:
        """These ran: the slot has room for the next (the key stays pinned until they end)."""
        slot = self.slots[index]
        for task_id in task_ids:
            slot.set_aside(task_id, slot.performed)

    def returned(self, index: int, task_ids: tuple[int, ...]) -> None:
        """A draining shard handed these back unstarted (the database releases them)."""
        for task_id in task_ids:
            self.ended(index, task_id)

    def shard_connected(self, index: int) -> list[int]:
        """A new shard (or the same one, after a fetcher restart) connected for a slot.

        Everything sent to the slot and not ended is lost (a shard drops its
        unstarted tasks when it loses the fetcher). Returns their ids, removed
        from ``sent``; the caller reads their database state and hands the
        unfinished ones to ``requeue``.
        """
        lost = list(self.slots[index].sent)
        self._lose(index, lost)
        self.online[index] = True
        return lost

    def shard_gone(self, index: int) -> None:
        """The slot's shard disconnected: until another connects, it takes nothing."""
        self.online[index] = False

    def _lose(self, index: int, task_ids: list[int]) -> None:
        slot = self.slots[index]
        for task_id in task_ids:
            task = slot.forget(task_id)
            if task is not None:
                self._left_flight(key_of(task))

    def requeue(self, index: int, tasks: list[TaskRow]) -> None:
        """Put lost tasks back ahead of their keys' waiting tasks, in id order.

        One committed ``running`` goes back to slot ``index`` only: its shard
        (this slot's) is the one to settle it.
        """
        for task in sorted(tasks, key=lambda t: t.id, reverse=True):
            key = key_of(task)
            if task.state == "running":
                self._pin(key, index)
            queue = self.waiting.get(key)
            if queue is None:
                queue = self.waiting[key] = deque()
            queue.appendleft(task)
            self.waiting_count += 1
            if len(queue) >= self.chain_depth:
                self.chains.add(key)
            self._mark_waiting(key)
            lane = self._free_lane(key)
            if key in lane:
                lane.move_to_end(key, last=False)
