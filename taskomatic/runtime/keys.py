"""Which ordering keys a multihost fetcher holds, and what to ask the database next.

Pure bookkeeping, no I/O, so it is unit-tested without processes. A key is
held under a claim (``key_claims`` row, fencing token) while this instance has
work for it. Per key the book counts the claimed tasks in hand (routed to a
shard and not ended) and whether the key's queue may hold more. From that it
answers the fetcher's three questions each round:

- ``choose_free``: which of the free keys the database offered to claim, up
  to ``shards x keys_per_shard`` held keys, so one instance never holds more
  than its shards can run soon (no hoarding: the others find free keys);
- ``wanting_tasks``: which held keys to top up with their next tasks, and how
  many (at most ``tasks_per_key`` in hand per key, which bounds memory);
- ``drained``: which held keys have nothing in hand and nothing more queued,
  or have had their turn (``TURN_KEYS`` x tasks_per_key tasks under one
  claim), to release so any instance can take them: a key with endless work
  circulates between instances instead of staying with the first one.
"""

from __future__ import annotations

from dataclasses import dataclass

from taskomatic.model import OrderingKey, TaskRow, key_of

# A claim covers at most this many top-ups' worth of tasks (tasks_per_key each).
TURN_KEYS = 4


@dataclass
class HeldKey:
    token: int
    in_hand: int = 0  # claimed tasks routed and not ended
    loaded: int = 0  # tasks claimed under this claim so far
    more: bool = True  # its queue may hold unclaimed tasks (unknown until a top-up comes back short)


class KeyBook:
    def __init__(self, shards: int, keys_per_shard: int, tasks_per_key: int) -> None:
        self.shards = shards
        self.keys_per_shard = keys_per_shard
        self.tasks_per_key = tasks_per_key
        self.keys: dict[OrderingKey, HeldKey] = {}
        self.task_keys: dict[int, OrderingKey] = {}

    @property
    def capacity(self) -> int:
        return self.shards * self.keys_per_shard

    @property
    def turn(self) -> int:
        return TURN_KEYS * self.tasks_per_key

    def key_room(self) -> int:
        return max(0, self.capacity - len(self.keys))

    def token_of(self, key: OrderingKey) -> int | None:
        held = self.keys.get(key)
        return None if held is None else held.token

    def hold(self, key: OrderingKey, token: int) -> None:
        """A claim won or taken over (or found at startup); a newer token replaces an older one."""
        held = self.keys.get(key)
        if held is None:
            self.keys[key] = HeldKey(token)
        elif token > held.token:  # a new claim: a new turn
            held.token, held.more, held.loaded = token, True, 0

    def add(self, task: TaskRow) -> None:
        """A claimed task of a held key is now in hand."""
        key = key_of(task)
        held = self.keys.get(key)
        if held is None or task.id in self.task_keys:
            return
        self.task_keys[task.id] = key
        held.in_hand += 1
        held.loaded += 1

    def ended(self, task_id: int) -> None:
        """A task left our hands (ended, skipped, handed back)."""
        key = self.task_keys.pop(task_id, None)
        if key is not None and key in self.keys:
            self.keys[key].in_hand -= 1

    def queue_changed(self) -> None:
        """New tasks may have been queued: every held key's queue is worth asking again."""
        for held in self.keys.values():
            held.more = True

    def choose_free(self, candidates: list[OrderingKey]) -> list[OrderingKey]:
        """The free keys worth claiming, in the order offered, within the capacity.

        Any shard may run any key (the dispatcher assigns keys to shards as they
        get room), so only the total is bounded.
        """
        fresh = [key for key in dict.fromkeys(candidates) if key not in self.keys]
        return fresh[:self.key_room()]

    def wanting_tasks(self) -> list[tuple[OrderingKey, int, int]]:
        """(key, token, count) for held keys to top up: those at or below half their allowance."""
        wanted = []
        for key, held in sorted(self.keys.items()):
            count = min(self.tasks_per_key - held.in_hand, self.turn - held.loaded)
            if held.more and count > 0 and held.in_hand <= self.tasks_per_key // 2:
                wanted.append((key, held.token, count))
        return wanted

    def topped_up(self, asked: list[tuple[OrderingKey, int, int]], got: dict[OrderingKey, int]) -> None:
        """A top-up came back: a key that got fewer tasks than asked has none left queued for now."""
        for key, _token, count in asked:
            held = self.keys.get(key)
            if held is not None and got.get(key, 0) < count:
                held.more = False

    def drained(self) -> list[tuple[OrderingKey, int]]:
        """(key, token) of held keys with nothing in hand and nothing more queued, or had their turn."""
        return [(key, held.token) for key, held in sorted(self.keys.items())
                if held.in_hand <= 0 and (not held.more or held.loaded >= self.turn)]

    def release(self, keys: list[OrderingKey]) -> None:
        for key in keys:
            self.keys.pop(key, None)
        self.task_keys = {t: k for t, k in self.task_keys.items() if k in self.keys}
