"""The fetcher's dispatch bookkeeping: which claimed task goes to which shard slot, and when.

A key is pinned to one slot while it has tasks in flight there, and free
otherwise; a slot is sent tasks while it has room (one whenever it has nothing
active, then expected work under ``lookahead``, never more than ``window_max``;
at most ``per_key_ahead`` of one key in flight).
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from taskomatic.model import OrderingKey, TaskRow, key_of
from taskomatic.partitions import DEFAULT_PARTITIONS, partition_of
from taskomatic.runtime.dispatch import CHAIN_AHEAD, LOOKAHEAD, PER_KEY_AHEAD, WINDOW_MAX, Dispatcher
from taskomatic.runtime.router import PinnedRouting, make_routing

VM = "Vm"


def task(task_id: int, vm: int = 1, state: str = "queued", kind: str = VM, action: str = "start_vm") -> TaskRow:
    return TaskRow(id=task_id, target_type=kind, target_id=vm, action=action, args={},
                   key_type=kind, key_id=vm, state=state)


def ids(tasks: list[TaskRow]) -> list[int]:
    return [t.id for t in tasks]


def waiting_ids(d: Dispatcher, vm: int) -> list[int]:
    return ids(list(d.waiting.get(OrderingKey(VM, vm), ())))


def sent_ids(d: Dispatcher, slot: int) -> list[int]:
    return list(d.slots[slot].sent)


def two_ahead(shards: int, window_max: int = WINDOW_MAX, per_key_ahead: int = 2) -> Dispatcher:
    """Each task is expected to take half the lookahead: a slot is sent two at a time. At most two
    tasks of a key in flight unless said otherwise (the default is three), so the examples stay short."""
    d = Dispatcher(shards=shards, lookahead=1.0, window_max=window_max, per_key_ahead=per_key_ahead)
    for action in ("start_vm", "refresh_pool", "create_volume"):
        d.learn(action, 0.5)
    return d


def check_consistent(d: Dispatcher) -> None:
    """The Dispatcher's own books agree with each other."""
    for key, count in d.in_flight.items():
        holding = [s.index for s in d.slots for t, _ in s.sent.values() if key_of(t) == key]
        assert len(holding) == count and set(holding) == {d.pinned[key]}, (key, holding)
    for slot in d.slots:
        for key in slot.pinned_waiting:
            assert d.pinned[key] == slot.index and d.waiting[key]
        assert slot.deferred <= set(slot.sent)
        expected = sum(e for i, (_, e) in slot.sent.items() if i not in slot.deferred)
        assert slot.work == pytest.approx(expected)
    for key in d.free_keys:
        assert key not in d.pinned and d.waiting[key]
    assert d.chains == {k for k, q in d.waiting.items() if len(q) >= d.chain_depth}
    for slot, lane in enumerate(d.homed_keys):
        for key in lane:
            assert key not in d.pinned and d.waiting[key] and d.routing.home(key) == slot
    for key, queue in d.waiting.items():
        assert queue and ids(list(queue)) == sorted(ids(list(queue)))
        free = key in d.free_keys or any(key in lane for lane in d.homed_keys)
        assert free != (key in d.pinned)
    assert d.waiting_count == sum(len(q) for q in d.waiting.values())


# -- keys --------------------------------------------------------------------------


def test_key_of_uses_the_ordering_key_columns() -> None:
    volume = TaskRow(id=1, target_type="StorageVolume", target_id=40, action="delete_volume", args={},
                     key_type="StoragePool", key_id=7, state="queued")
    assert key_of(volume) == OrderingKey("StoragePool", 7)
    assert key_of(task(1, vm=3)) == OrderingKey("Vm", 3)


def test_key_of_falls_back_to_target_type() -> None:
    row = TaskRow(id=1, target_type="Vm", target_id=3, action="start_vm", args={}, key_type=None, key_id=3,
                  state="queued")
    assert key_of(row) == OrderingKey("Vm", 3)


def test_volume_work_goes_with_its_pool() -> None:
    d = two_ahead(shards=4)
    d.route(TaskRow(id=1, target_type="StoragePool", target_id=7, action="refresh_pool", args={},
                    key_type="StoragePool", key_id=7, state="queued"))
    d.route(TaskRow(id=2, target_type="StorageVolume", target_id=99, action="create_volume", args={},
                    key_type="StoragePool", key_id=7, state="queued"))
    assert ids(d.take_sendable(2)) == [1, 2]
    assert [d.take_sendable(i) for i in (0, 1, 3)] == [[], [], []]


# -- a key's tasks: one slot while in flight, in id order ---------------------------


def test_route_keeps_a_keys_tasks_waiting_in_id_order() -> None:
    d = Dispatcher(shards=4)
    for i in (3, 8, 11):
        d.route(task(i, vm=5))
    assert waiting_ids(d, 5) == [3, 8, 11]
    assert list(d.free_keys) == [OrderingKey(VM, 5)]
    assert d.pinned == {}
    check_consistent(d)


def test_a_keys_tasks_go_to_one_slot_while_in_flight() -> None:
    d = two_ahead(shards=3)
    for i in range(1, 7):
        d.route(task(i, vm=1))
    assert ids(d.take_sendable(1)) == [1, 2]  # two in flight (half the lookahead each)
    assert d.pinned == {OrderingKey(VM, 1): 1}
    assert d.take_sendable(0) == [] and d.take_sendable(2) == []  # room, but the key is pinned to 1
    d.ended(1, 1)
    assert d.take_sendable(0) == [] and d.take_sendable(2) == []  # task 2 is still in flight in 1
    assert ids(d.take_sendable(1)) == [3]
    d.ended(1, 2)
    d.ended(1, 3)
    assert OrderingKey(VM, 1) not in d.pinned  # nothing in flight: free again
    check_consistent(d)


def test_a_free_key_goes_to_the_first_slot_with_room() -> None:
    d = two_ahead(shards=3)
    for i in range(1, 5):
        d.route(task(i, vm=1))
    assert ids(d.take_sendable(0)) == [1, 2]
    d.ended(0, 1)
    d.ended(0, 2)
    assert ids(d.take_sendable(2)) == [3, 4]  # free: whichever slot asks first
    assert d.pinned == {OrderingKey(VM, 1): 2}
    assert d.take_sendable(0) == []
    check_consistent(d)


def test_free_keys_go_out_in_the_order_they_got_work() -> None:
    d = two_ahead(shards=3)
    for i, vm in enumerate((7, 3, 9, 1), start=1):
        d.route(task(i, vm=vm))
    assert ids(d.take_sendable(1)) == [1, 2]
    assert ids(d.take_sendable(0)) == [3, 4]


def test_a_key_freed_with_work_left_goes_ahead_of_keys_that_got_work_later() -> None:
    d = two_ahead(shards=2)
    d.route(task(1, vm=1))
    d.route(task(2, vm=1))
    d.route(task(3, vm=1))
    assert ids(d.take_sendable(0)) == [1, 2]
    d.route(task(4, vm=2))
    d.ended(0, 1)
    d.ended(0, 2)  # vm 1 is free again, with task 3 waiting
    assert list(d.free_keys) == [OrderingKey(VM, 1), OrderingKey(VM, 2)]
    assert ids(d.take_sendable(1)) == [3, 4]


def test_a_slot_prefers_its_pinned_keys_next_tasks() -> None:
    d = two_ahead(shards=2)
    d.route(task(1, vm=1))
    d.route(task(2, vm=2))
    d.route(task(3, vm=1))
    d.route(task(4, vm=1))
    assert ids(d.take_sendable(0)) == [1, 3]  # vm 1's chain before vm 2's older task 2
    assert ids(d.take_sendable(1)) == [2]  # vm 2 goes elsewhere
    d.ended(0, 1)
    assert ids(d.take_sendable(0)) == [4]


def test_a_key_stays_pinned_until_its_last_task_there_ends() -> None:
    d = two_ahead(shards=2)
    for i in range(1, 4):
        d.route(task(i, vm=1))
    assert ids(d.take_sendable(0)) == [1, 2]
    d.ended(0, 2)  # out of order (a batch may commit them together): 1 is still in flight
    assert d.pinned == {OrderingKey(VM, 1): 0}
    assert d.take_sendable(1) == []
    assert ids(d.take_sendable(0)) == [3]


def test_at_most_per_key_ahead_tasks_of_a_key_in_flight() -> None:
    d = Dispatcher(shards=2, lookahead=1.0, per_key_ahead=2)
    d.learn("quick", 0.1)
    for i in range(1, 6):
        d.route(task(i, vm=1, action="quick"))
    for i in range(6, 9):
        d.route(task(i, vm=i, action="quick"))
    assert ids(d.take_sendable(0)) == [1, 2, 6, 7, 8]  # room for more, but not for vm 1
    assert d.take_sendable(1) == []  # vm 1 is pinned to slot 0
    d.ended(0, 2)
    assert ids(d.take_sendable(0)) == [3]
    d.ended(0, 1)
    d.ended(0, 3)
    assert ids(d.take_sendable(1)) == [4, 5]  # free again: any slot
    check_consistent(d)


@pytest.mark.parametrize("ahead", [1, 3])
def test_per_key_ahead_is_a_parameter(ahead: int) -> None:
    d = Dispatcher(shards=1, lookahead=1.0, per_key_ahead=ahead)
    d.learn("quick", 0.1)
    for i in range(1, 6):
        d.route(task(i, vm=1, action="quick"))
    assert len(d.take_sendable(0)) == ahead


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_full_cycle_ends_everything_in_key_order(shards: int, seed: int) -> None:
    rng = random.Random(seed)
    d = Dispatcher(shards=shards, lookahead=1.0, window_max=6)
    d.learn("quick", 0.1)
    tasks = [task(i, vm=rng.randint(1, 4), action=rng.choice(("quick", "slow"))) for i in range(1, 41)]
    for t in tasks[:20]:
        d.route(t)
    started: list[TaskRow] = []
    running: list[list[int]] = [[] for _ in range(shards)]  # each slot runs what it is sent in order
    routed = 20
    while d.held():
        slot = rng.randrange(shards)
        running[slot] += ids(d.take_sendable(slot))
        check_consistent(d)
        if running[slot] and rng.random() < 0.7:
            done = running[slot].pop(0)
            started.append(tasks[done - 1])
            d.ended(slot, done)
        if routed < len(tasks) and rng.random() < 0.3:
            d.route(tasks[routed])
            routed += 1
        if not d.held() and routed < len(tasks):
            d.route(tasks[routed])
            routed += 1
    for vm in range(1, 5):
        mine = [t.id for t in started if t.key_id == vm]
        assert mine == sorted(mine)
    assert sorted(ids(started)) == list(range(1, 41))
    assert d.pinned == {} and d.in_flight == {}


# -- room ----------------------------------------------------------------------------


def test_one_at_a_time_while_an_action_is_unknown() -> None:
    d = Dispatcher(shards=1)
    for i in range(1, 6):
        d.route(task(i, vm=i))
    assert ids(d.take_sendable(0)) == [1]
    assert d.slots[0].work == pytest.approx(LOOKAHEAD)  # an unknown action counts as a whole lookahead
    assert d.take_sendable(0) == []
    d.ended(0, 1)
    d.learn("start_vm", 0.001)
    assert ids(d.take_sendable(0)) == [2, 3, 4, 5]  # known quick now: many at once


def test_one_at_a_time_while_an_action_is_unknown_whatever_the_lookahead() -> None:
    d = Dispatcher(shards=1, lookahead=1.0)
    for i in range(1, 6):
        d.route(task(i, vm=i))
    assert ids(d.take_sendable(0)) == [1]


def test_a_slot_with_nothing_active_always_gets_one_however_slow() -> None:
    d = Dispatcher(shards=1, lookahead=1.0)
    d.learn("slow", 60.0)
    for i in range(1, 6):
        d.route(task(i, vm=i, action="slow"))
    assert ids(d.take_sendable(0)) == [1]  # alone: nothing waits behind a slow task
    assert d.take_sendable(0) == []
    d.ended(0, 1)
    assert ids(d.take_sendable(0)) == [2]


def test_performed_makes_room_but_the_key_stays_pinned_until_it_ends() -> None:
    d = Dispatcher(shards=2, lookahead=1.0, per_key_ahead=2)
    d.learn("slow", 60.0)
    for i in range(1, 4):
        d.route(task(i, vm=1, action="slow"))
    d.route(task(4, vm=2, action="slow"))
    # 1, and vm 1's next at once: it can run nowhere else before 1 ends.
    assert ids(d.take_sendable(0)) == [1, 2]
    d.performed(0, (1,))  # it ran; its outcome waits for the next start's commit (2's)
    assert d.slots[0].active == 1 and d.slots[0].work == pytest.approx(60.0)
    assert ids(d.take_sendable(1)) == [4]  # vm 1 is still pinned to slot 0
    assert d.take_sendable(0) == []  # vm 1: per_key_ahead in flight; 2 is slow: no room for another key
    d.performed(0, (1, 2, 2))  # again, or twice: counted once
    assert d.slots[0].performed == {1, 2} and d.slots[0].work == 0
    assert d.take_sendable(0) == []  # per_key_ahead: 1 and 2 are in flight until they end
    d.ended(0, 1)
    assert d.slots[0].work == 0  # it counted for no work any more
    assert ids(d.take_sendable(0)) == [3]
    d.performed(0, (99,))  # unknown: harmless
    d.ended(0, 2)
    d.ended(0, 3)
    assert d.pinned == {OrderingKey(VM, 2): 1}
    check_consistent(d)


def test_quick_tasks_go_out_while_expected_work_is_under_lookahead() -> None:
    d = Dispatcher(shards=1, lookahead=1.0)
    d.learn("quick", 0.25)
    for i in range(1, 11):
        d.route(task(i, vm=i, action="quick"))
    assert ids(d.take_sendable(0)) == [1, 2, 3, 4]  # 0.75 < 1.0 before the 4th; 1.0 after it
    assert d.slots[0].work == pytest.approx(1.0)
    assert not d.has_room(0)
    d.ended(0, 1)
    assert ids(d.take_sendable(0)) == [5]


def test_learn_changes_how_many_quick_tasks_go_out_at_once() -> None:
    def sent_at_once(d: Dispatcher) -> int:
        for i in range(1, 21):
            d.route(task(i, vm=i, action="quick"))
        return len(d.take_sendable(0))

    slow = Dispatcher(shards=1, lookahead=1.0)
    slow.learn("quick", 0.5)
    assert sent_at_once(slow) == 2
    learned = Dispatcher(shards=1, lookahead=1.0)
    learned.learn("quick", 0.125)
    assert sent_at_once(learned) == 8
    slower = Dispatcher(shards=1, lookahead=1.0)
    slower.learn("quick", 0.125)
    slower.learn("quick", 0.125 + 5 * 0.125)  # running estimate: 0.125 + 0.2 * 0.625 = 0.25
    assert slower.estimate("quick") == pytest.approx(0.25)
    assert sent_at_once(slower) == 4


def test_learn_keeps_a_running_estimate_per_action() -> None:
    d = Dispatcher(shards=1)
    assert d.estimate("never_seen") == LOOKAHEAD
    d.learn("a", 1.0)
    assert d.estimate("a") == 1.0  # the first measure is taken as it is
    d.learn("a", 2.0)
    assert d.estimate("a") == pytest.approx(1.2)
    assert d.estimate("b") == LOOKAHEAD


def test_never_more_than_window_max_however_quick() -> None:
    d = Dispatcher(shards=1, lookahead=1.0, window_max=5)
    d.learn("instant", 0.0)
    for i in range(1, 21):
        d.route(task(i, vm=i, action="instant"))
    assert ids(d.take_sendable(0)) == [1, 2, 3, 4, 5]
    assert d.take_sendable(0) == []
    d.ended(0, 3)
    assert ids(d.take_sendable(0)) == [6]
    assert len(d.slots[0].sent) == 5


def test_work_is_counted_with_the_estimate_a_task_was_sent_with() -> None:
    d = Dispatcher(shards=1, lookahead=1.0)
    d.learn("a", 0.25)
    for i in range(1, 4):
        d.route(task(i, vm=i, action="a"))
    assert len(d.take_sendable(0)) == 3
    d.learn("a", 10.0)  # a later measure does not change what the sent ones count for
    d.ended(0, 1)
    assert d.slots[0].work == pytest.approx(0.5)


def test_windows_are_per_slot() -> None:
    d = two_ahead(shards=2)
    for i in range(1, 7):
        d.route(task(i, vm=i))
    assert ids(d.take_sendable(0)) == [1, 2]
    assert ids(d.take_sendable(1)) == [3, 4]
    d.ended(1, 3)
    assert d.take_sendable(0) == []  # another slot's end frees nothing here
    assert ids(d.take_sendable(1)) == [5]


def test_empty_dispatcher_sends_nothing() -> None:
    d = Dispatcher(shards=3)
    assert [d.take_sendable(i) for i in range(3)] == [[], [], []]
    assert d.held() == 0
    assert d.in_hand() == set()


# -- deferred ----------------------------------------------------------------------------


def test_deferred_tasks_do_not_count_as_work() -> None:
    d = Dispatcher(shards=1, lookahead=1.0)
    d.learn("a", 0.5)
    for i in range(1, 8):
        d.route(task(i, vm=i, action="a"))
    assert ids(d.take_sendable(0)) == [1, 2]
    d.defer(0, (1,))
    assert d.slots[0].active == 1
    assert d.slots[0].work == pytest.approx(0.5)
    assert ids(d.take_sendable(0)) == [3]  # the parked one no longer holds the slot
    d.defer(0, (1, 1, 2))  # twice, or again: counted once
    assert d.slots[0].work == pytest.approx(0.5)
    assert ids(d.take_sendable(0)) == [4]
    d.ended(0, 1)  # a deferred task ending frees no work: it counted for none
    assert d.slots[0].work == pytest.approx(1.0)
    assert d.slots[0].deferred == {2}
    assert d.held() == 6
    check_consistent(d)


def test_a_deferred_task_keeps_its_key_pinned() -> None:
    d = two_ahead(shards=2)
    for i in (1, 2, 3):
        d.route(task(i, vm=1))
    assert ids(d.take_sendable(0)) == [1, 2]
    d.defer(0, (1, 2))  # parked for a retry, and the next behind it
    assert d.take_sendable(1) == []
    d.route(task(4, vm=2))
    assert ids(d.take_sendable(0)) == [4]  # no work in hand: other keys' tasks come, not vm 1's third
    d.ended(0, 1)
    assert d.take_sendable(1) == []
    assert ids(d.take_sendable(0)) == [3]  # to the same slot, behind 2
    assert d.pinned == {OrderingKey(VM, 1): 0, OrderingKey(VM, 2): 0}
    check_consistent(d)


def test_defer_of_an_unknown_task_is_harmless() -> None:
    d = two_ahead(shards=1)
    d.route(task(1))
    d.take_sendable(0)
    d.defer(0, (99,))
    assert d.slots[0].deferred == set()
    assert d.slots[0].active == 1


# -- route(task, slot): a task its shard committed running ----------------------------


def test_route_to_a_slot_pins_the_key_there() -> None:
    d = two_ahead(shards=3)
    d.route(task(1, vm=1, state="running"), slot=2)
    d.route(task(2, vm=1))  # the key's later tasks follow it
    assert d.take_sendable(0) == [] and d.take_sendable(1) == []
    out = d.take_sendable(2)
    assert ids(out) == [1, 2] and out[0].state == "running"
    d.ended(2, 1)
    d.ended(2, 2)
    assert d.pinned == {}
    check_consistent(d)


def test_route_to_a_slot_takes_a_free_key_with_it() -> None:
    d = two_ahead(shards=2)
    d.route(task(1, vm=2))
    d.route(task(2, vm=1, state="running"), slot=1)
    assert OrderingKey(VM, 1) not in d.free_keys
    assert ids(d.take_sendable(0)) == [1]
    assert ids(d.take_sendable(1)) == [2]


def test_route_to_another_slot_than_the_pinned_one_is_refused() -> None:
    d = two_ahead(shards=2)
    d.route(task(1, vm=1))
    d.take_sendable(0)
    with pytest.raises(ValueError):
        d.route(task(2, vm=1, state="running"), slot=1)


# -- a shard is replaced: shard_connected and requeue -----------------------------------


def test_shard_connected_returns_everything_sent_and_not_ended() -> None:
    d = Dispatcher(shards=1, lookahead=1.0, per_key_ahead=2)
    d.learn("a", 0.25)
    for i in range(1, 7):
        d.route(task(i, vm=1 + i % 2, action="a"))
    assert ids(d.take_sendable(0)) == [1, 3, 2, 4]  # two of vm 2 (pinned, per_key_ahead), then vm 1
    d.ended(0, 1)
    d.defer(0, (3,))
    assert d.shard_connected(0) == [3, 2, 4]
    assert d.slots[0].sent == {} and d.slots[0].deferred == set() and d.slots[0].work == 0
    assert d.pinned == {} and d.in_flight == {}
    assert waiting_ids(d, 1) == [6] and waiting_ids(d, 2) == [5]  # untouched until requeued
    check_consistent(d)


def test_shard_connected_to_a_new_slot_returns_nothing() -> None:
    d = two_ahead(shards=2)
    d.route(task(1))
    assert d.shard_connected(0) == []
    assert waiting_ids(d, 1) == [1]


def test_shard_connected_touches_only_its_slot() -> None:
    d = two_ahead(shards=2)
    d.route(task(1, vm=1))
    d.route(task(2, vm=2))
    assert ids(d.take_sendable(0)) == [1, 2]
    d.route(task(3, vm=3))
    assert ids(d.take_sendable(1)) == [3]
    assert d.shard_connected(0) == [1, 2]
    assert sent_ids(d, 1) == [3]
    assert d.pinned == {OrderingKey(VM, 3): 1}


def test_requeue_puts_lost_tasks_ahead_of_their_keys_later_ones() -> None:
    d = Dispatcher(shards=2, lookahead=1.0, per_key_ahead=8)
    d.learn("start_vm", 0.25)
    for i in range(1, 4):
        d.route(task(i, vm=1))
    assert ids(d.take_sendable(0)) == [1, 2, 3]
    d.route(task(4, vm=1))
    d.route(task(5, vm=2))
    lost = d.shard_connected(0)
    d.requeue(0, [task(i, vm=1) for i in reversed(lost)])  # any order in: id order out
    assert waiting_ids(d, 1) == [1, 2, 3, 4]
    # Free again (nothing of it in flight): whichever slot has room, ahead of vm 2.
    assert ids(d.take_sendable(1)) == [1, 2, 3, 4]
    assert ids(d.take_sendable(0)) == [5]
    check_consistent(d)


def test_requeued_keys_go_ahead_of_keys_that_got_work_later() -> None:
    d = Dispatcher(shards=1, lookahead=1.0)
    d.learn("start_vm", 0.25)
    d.route(task(1, vm=1))
    d.route(task(2, vm=2))
    assert ids(d.take_sendable(0)) == [1, 2]
    d.route(task(3, vm=3))
    d.route(task(4, vm=2))
    lost = d.shard_connected(0)
    d.requeue(0, [task(i, vm=i) for i in lost])
    assert list(d.free_keys) == [OrderingKey(VM, 1), OrderingKey(VM, 2), OrderingKey(VM, 3)]
    assert ids(d.take_sendable(0)) == [1, 2, 4, 3]  # vm 2's chain follows it (pinned)


def test_requeue_pins_a_running_task_to_the_slot_that_marked_it() -> None:
    d = two_ahead(shards=3)
    for i in (1, 2, 3):
        d.route(task(i, vm=1))
    assert ids(d.take_sendable(0)) == [1, 2]
    lost = d.shard_connected(0)
    d.requeue(0, [task(1, vm=1, state="running"), task(2, vm=1)])
    assert lost == [1, 2]
    assert d.pinned == {OrderingKey(VM, 1): 0}
    assert d.take_sendable(1) == [] and d.take_sendable(2) == []  # only its shard may settle it
    out = d.take_sendable(0)
    assert ids(out) == [1, 2] and out[0].state == "running"
    check_consistent(d)


def test_requeue_drops_what_the_caller_leaves_out() -> None:
    # The caller drops the tasks the database says have ended (Fetcher._resync).
    d = two_ahead(shards=1)
    for i in range(1, 5):
        d.route(task(i))
    d.take_sendable(0)
    lost = d.shard_connected(0)
    d.requeue(0, [task(i) for i in lost if i != 1])
    assert waiting_ids(d, 1) == [2, 3, 4]
    assert d.in_hand() == {2, 3, 4}
    assert d.held() == 3


# -- unsend ---------------------------------------------------------------------------


def test_unsend_puts_back_ahead_in_order() -> None:
    d = Dispatcher(shards=2, lookahead=1.0, per_key_ahead=4)
    d.learn("start_vm", 0.25)
    for i in range(1, 8):
        d.route(task(i))
    assert ids(d.take_sendable(0)) == [1, 2, 3, 4]
    d.ended(0, 1)
    batch = d.take_sendable(0)
    assert ids(batch) == [5]
    d.unsend(0, batch)
    assert sent_ids(d, 0) == [2, 3, 4]
    assert waiting_ids(d, 1) == [5, 6, 7]
    assert d.pinned == {OrderingKey(VM, 1): 0}  # 2..4 are still in flight there
    assert d.take_sendable(1) == []
    check_consistent(d)


def test_unsend_everything_frees_the_keys() -> None:
    d = two_ahead(shards=2)
    for i in (10, 20, 30):
        d.route(task(i))
    batch = d.take_sendable(0)
    d.unsend(0, batch)
    assert d.slots[0].sent == {} and d.slots[0].work == 0
    assert waiting_ids(d, 1) == [10, 20, 30]
    assert d.held() == 3
    assert ids(d.take_sendable(1)) == [10, 20]  # the shard never got them: any slot may
    check_consistent(d)


def test_unsend_of_a_task_to_settle_keeps_it_on_its_slot() -> None:
    d = Dispatcher(shards=2)
    d.route(task(1, state="running"), slot=1)
    batch = d.take_sendable(1)
    d.unsend(1, batch)
    assert d.pinned == {OrderingKey(VM, 1): 1}
    assert d.take_sendable(0) == []
    assert ids(d.take_sendable(1)) == [1]


# -- drain, ended, counts ---------------------------------------------------------------


def test_returned_frees_the_slot_without_requeueing() -> None:
    d = Dispatcher(shards=1, lookahead=1.0)
    d.learn("start_vm", 0.25)
    for i in range(1, 7):
        d.route(task(i, vm=i))
    assert ids(d.take_sendable(0)) == [1, 2, 3, 4]
    d.ended(0, 1)
    d.returned(0, (2, 3, 4))
    assert d.slots[0].sent == {} and d.slots[0].work == 0
    assert d.in_hand() == {5, 6}
    assert d.held() == 2
    assert d.pinned == {} and d.in_flight == {}
    check_consistent(d)


def test_ended_of_an_unknown_task_is_harmless() -> None:
    d = two_ahead(shards=2)
    d.route(task(1))
    d.take_sendable(0)
    d.ended(0, 99)
    d.ended(1, 1)  # not sent to that slot
    assert sent_ids(d, 0) == [1]
    assert d.in_flight == {OrderingKey(VM, 1): 1}


def test_held_and_in_hand_count_waiting_and_sent() -> None:
    d = two_ahead(shards=3)
    for i, vm in enumerate((1, 1, 1, 2, 3, 4, 4), start=1):
        d.route(task(i, vm=vm))
    assert d.held() == 7 and d.in_hand() == set(range(1, 8))
    for slot in range(3):
        d.take_sendable(slot)
    assert sum(len(s.sent) for s in d.slots) == 6
    assert d.held() == 7 and d.in_hand() == set(range(1, 8))
    d.ended(0, 1)
    assert d.held() == 6 and d.in_hand() == set(range(2, 8))


# -- the point of the design -------------------------------------------------------------


def test_a_hot_key_with_a_slow_task_does_not_hold_up_other_keys() -> None:
    d = Dispatcher(shards=2, lookahead=1.0, per_key_ahead=2)
    d.learn("slow", 600.0)
    d.learn("quick", 0.1)
    hot = OrderingKey(VM, 1)
    d.route(task(1, vm=1, action="slow"))
    task_id = 2
    for _ in range(5):
        d.route(task(task_id, vm=1, action="quick"))
        task_id += 1
    for vm in range(2, 12):
        d.route(task(task_id, vm=vm, action="quick"))
        task_id += 1
    assert ids(d.take_sendable(0)) == [1, 2]  # the hot key's slow task, and its next (it can only follow 1)
    # Slot 0 is stuck on task 1; every other key runs on slot 1, as many at a time as are quick.
    ran: list[int] = []
    for _ in range(10):
        out = d.take_sendable(1)
        assert all(key_of(t) != hot for t in out)
        if out:
            ran += ids(out)
            for t in out:
                d.ended(1, t.id)
    assert sorted(ran) == list(range(7, 17))
    assert d.take_sendable(0) == []  # the hot key's chain waits for its slot
    assert waiting_ids(d, 1) == [3, 4, 5, 6]
    d.ended(0, 1)
    assert ids(d.take_sendable(0)) == [3]  # quick ones: per_key_ahead of them at most (2 and 3)


# -- hash routing: a fixed home slot per key -------------------------------------------------


def hashed(shards: int) -> Dispatcher:
    d = Dispatcher(shards=shards, lookahead=1.0, routing=make_routing("hash", shards), per_key_ahead=2)
    for action in ("start_vm", "refresh_pool", "create_volume"):
        d.learn(action, 0.5)
    return d


def vm_homed_at(slot: int, shards: int, skip: int = 0) -> int:
    """A VM id whose home slot is ``slot`` (the ``skip``-th such)."""
    found = [vm for vm in range(1, 1000) if partition_of(OrderingKey(VM, vm), DEFAULT_PARTITIONS) % shards == slot]
    return found[skip]


def test_hash_routing_sends_a_key_only_to_its_home_slot_whatever_the_load() -> None:
    d = hashed(shards=3)
    vm = vm_homed_at(1, 3)
    for i in range(1, 5):
        d.route(task(i, vm=vm))
    assert d.take_sendable(0) == [] and d.take_sendable(2) == []  # idle, but not its home
    assert ids(d.take_sendable(1)) == [1, 2]
    d.ended(1, 1)
    d.ended(1, 2)
    assert OrderingKey(VM, vm) not in d.pinned  # nothing in flight...
    assert d.take_sendable(0) == []  # ...and still only its home takes it
    assert ids(d.take_sendable(1)) == [3, 4]
    check_consistent(d)


def test_hash_routing_waits_for_room_at_home_while_other_slots_idle() -> None:
    d = hashed(shards=2)
    first, second = vm_homed_at(0, 2), vm_homed_at(0, 2, skip=1)
    d.route(task(1, vm=first))
    d.route(task(2, vm=first))
    d.route(task(3, vm=second))
    assert ids(d.take_sendable(0)) == [1, 2]  # a full lookahead: no room for the other key
    assert d.take_sendable(1) == []
    assert d.take_sendable(0) == []
    d.ended(0, 1)
    assert ids(d.take_sendable(0)) == [3]
    check_consistent(d)


def test_hash_routing_settles_an_interrupted_task_on_its_slot_then_goes_home() -> None:
    d = hashed(shards=2)
    vm = vm_homed_at(0, 2)
    d.route(task(1, vm=vm, state="running"), slot=1)  # marked running by slot 1 (pinned routing, before)
    d.route(task(2, vm=vm))
    assert d.take_sendable(0) == []
    assert ids(d.take_sendable(1)) == [1, 2]  # the chain behind it stays there while in flight
    d.ended(1, 1)
    d.ended(1, 2)
    d.route(task(3, vm=vm))
    assert d.take_sendable(1) == []
    assert ids(d.take_sendable(0)) == [3]
    check_consistent(d)


def test_routing_names() -> None:
    assert isinstance(Dispatcher(shards=2).routing, PinnedRouting)
    assert make_routing("pinned", 4).home(OrderingKey(VM, 1)) is None
    with pytest.raises(ValueError, match="hash, pinned"):
        make_routing("round-robin", 4)


def test_three_tasks_of_a_key_in_flight_by_default() -> None:
    """The running one, the one its outcome's commit starts, and the one after: the shard never waits
    for the fetcher between two links of a chain."""
    d = Dispatcher(shards=1, lookahead=1.0)
    d.learn("start_vm", 0.001)
    for i in range(1, 6):
        d.route(task(i, vm=1))
    assert ids(d.take_sendable(0)) == [1, 2, 3]
    d.ended(0, 1)
    assert ids(d.take_sendable(0)) == [4]
    check_consistent(d)


def chained(shards: int, depth: int = 4, seconds: float = 0.001, routing: str = "pinned",
            chain_ahead: int = 3) -> Dispatcher:
    """Tasks of ``seconds`` each, every slot's shard connected; a key with ``depth`` tasks waiting is a chain
    (with ``chain_ahead`` of its tasks in flight at most: three, as other keys, unless said otherwise)."""
    d = Dispatcher(shards=shards, lookahead=1.0, chain_depth=depth, routing=make_routing(routing, shards),
                   chain_ahead=chain_ahead)
    d.learn("start_vm", seconds)
    for index in range(shards):
        d.shard_connected(index)
    return d


def chain_on_slot_0(d: Dispatcher, vm: int = 1) -> Dispatcher:
    """Ten tasks of ``vm`` claimed, three of them sent to slot 0: it runs a chain."""
    for i in range(1, 11):
        d.route(task(i, vm=vm))
    assert ids(d.take_sendable(0)) == [1, 2, 3]
    assert 0 in d.chain_slots()
    return d


def test_a_slot_running_a_chain_leaves_free_keys_to_a_slot_without_one() -> None:
    d = chain_on_slot_0(chained(shards=2))
    assert d.chain_slots() == {0}
    d.route(task(11, vm=2))
    d.route(task(12, vm=3))
    assert d.take_sendable(0) == []  # slot 1 has room and no chain: the free keys are its
    assert ids(d.take_sendable(1)) == [11, 12]
    d.ended(0, 1)
    assert ids(d.take_sendable(0)) == [4]  # the chain itself goes on at once
    check_consistent(d)


def test_a_chain_slot_takes_free_keys_when_no_other_slot_can() -> None:
    d = chain_on_slot_0(chained(shards=2))
    d.shard_gone(1)  # the other slot's shard is away: nobody else would take them
    d.route(task(11, vm=2))
    assert ids(d.take_sendable(0)) == [11]
    d.shard_connected(1)
    for i in range(12, 22):  # vm 3: a chain of its own, on slot 1
        d.route(task(i, vm=3))
    assert ids(d.take_sendable(1)) == [12, 13, 14]
    d.route(task(22, vm=4))
    assert ids(d.take_sendable(0)) == [22]  # every slot runs a chain: the first with room takes it
    check_consistent(d)


def test_a_key_stops_being_a_chain_once_its_queue_is_short() -> None:
    d = chained(shards=2, depth=4)
    for i in range(1, 6):
        d.route(task(i, vm=1))
    assert OrderingKey(VM, 1) in d.chains
    assert ids(d.take_sendable(0)) == [1, 2, 3]  # two left waiting
    assert OrderingKey(VM, 1) not in d.chains and 0 not in d.chain_slots()
    d.route(task(6, vm=2))
    assert ids(d.take_sendable(0)) == [6]  # no chain here any more: free keys are welcome
    check_consistent(d)


def test_a_chain_has_more_tasks_in_flight_than_another_key() -> None:
    """A chain's shard must not run out of its next link while the fetcher is busy: ten of its tasks may be
    in flight by default, where another key has three; once its queue is short, it is back to three."""
    d = chained(shards=1, depth=4, chain_ahead=CHAIN_AHEAD)
    assert CHAIN_AHEAD > PER_KEY_AHEAD
    for i in range(1, 31):
        d.route(task(i, vm=1))
    for i in range(31, 36):
        d.route(task(i, vm=2))
    sent = ids(d.take_sendable(0))
    assert [i for i in sent if i <= 30] == list(range(1, CHAIN_AHEAD + 1))  # the chain: ten ahead
    assert [i for i in sent if i > 30] == [31, 32, 33]  # an ordinary key: three
    assert ids(d.take_sendable(0)) == []
    d.ended(0, 1)
    assert ids(d.take_sendable(0)) == [CHAIN_AHEAD + 1]  # one link ended, the next goes at once
    check_consistent(d)
    # End its oldest in flight, one at a time, until fewer than four of its tasks wait: an ordinary key again.
    chain = OrderingKey(VM, 1)

    def end_oldest() -> None:
        d.ended(0, min(i for i in d.slots[0].sent if i <= 30))

    while chain in d.chains:
        end_oldest()
        d.take_sendable(0)
    assert d.in_flight[chain] > PER_KEY_AHEAD and chain in d.waiting
    while d.in_flight[chain] >= PER_KEY_AHEAD:
        assert ids(d.take_sendable(0)) == []  # nothing more of it until it is under three
        end_oldest()
    assert len(ids(d.take_sendable(0))) == 1
    check_consistent(d)


def test_dropped_partitions_take_their_chains_with_them() -> None:
    d = chained(shards=1, depth=2)
    for i in range(1, 4):
        d.route(replace(task(i, vm=1), partition=7))
    assert OrderingKey(VM, 1) in d.chains
    d.drop_partitions({7})
    assert not d.chains


def test_hash_routing_sends_homed_keys_to_a_chains_slot_all_the_same() -> None:
    """A key homed on a slot has nowhere else to go: a chain there does not hold it back."""
    d = chained(shards=2, routing="hash")
    hot, other = vm_homed_at(0, 2), vm_homed_at(0, 2, skip=1)
    for i in range(1, 11):
        d.route(task(i, vm=hot))
    d.route(task(11, vm=other))
    assert ids(d.take_sendable(0)) == [1, 2, 3, 11]  # slot 1 has room and no chain, but 11 lives here
    assert 0 in d.chain_slots() and d.has_room(1) and d.take_sendable(1) == []
    check_consistent(d)


def test_a_chain_slot_takes_free_keys_when_the_others_have_no_room() -> None:
    d = chain_on_slot_0(chained(shards=2, seconds=0.3))  # four tasks fill a slot's lookahead
    for i in range(11, 16):
        d.route(task(i, vm=i))
    assert ids(d.take_sendable(1)) == [11, 12, 13, 14]
    assert not d.has_room(1) and d.has_room(0)
    assert ids(d.take_sendable(0)) == [15]  # slot 1 is full: the chain's slot takes it rather than leave it
    check_consistent(d)


def test_a_chain_slot_with_everything_parked_takes_free_keys() -> None:
    """Its chain waits for a retry: the slot is idle, and must not turn work away meanwhile."""
    d = chain_on_slot_0(chained(shards=2))
    d.defer(0, (1, 2, 3))
    d.route(task(11, vm=2))
    assert ids(d.take_sendable(0)) == [11]
    check_consistent(d)


def test_chain_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chain_depth"):
        Dispatcher(shards=1, chain_depth=0)
