"""The fetcher's routing bookkeeping: backlog, send window, lost and requeued tasks."""

from __future__ import annotations

import pytest

from taskomatic.runtime.dispatch import Dispatcher, key_of
from taskomatic.runtime.messages import TaskRow
from taskomatic.runtime.router import OrderingKey, shard_for


def task(task_id: int, vm: int = 1, state: str = "queued", kind: str = "Vm") -> TaskRow:
    return TaskRow(id=task_id, target_type=kind, target_id=vm, action="start_vm", args={},
                   key_type=kind, key_id=vm, state=state)


def ids(tasks: list[TaskRow] | list[int]) -> list[int]:
    return [t if isinstance(t, int) else t.id for t in tasks]


def backlog_ids(d: Dispatcher, slot: int) -> list[int]:
    return [t.id for t in d.slots[slot].backlog]


def vms_on_distinct_slots(shards: int, count: int) -> list[int]:
    """VM ids whose keys route to ``count`` different slots."""
    found: dict[int, int] = {}
    for vm in range(1, 10_000):
        found.setdefault(shard_for(OrderingKey("Vm", vm), shards), vm)
        if len(found) == count:
            return list(found.values())
    raise AssertionError("not enough distinct slots")


def vms_on_one_slot(shards: int, count: int) -> list[int]:
    target = shard_for(OrderingKey("Vm", 1), shards)
    vms = [vm for vm in range(1, 10_000) if shard_for(OrderingKey("Vm", vm), shards) == target]
    return vms[:count]


# -- keys and routing --------------------------------------------------------------


def test_key_of_uses_the_ordering_key_columns() -> None:
    volume = TaskRow(id=1, target_type="StorageVolume", target_id=40, action="delete_volume", args={},
                     key_type="StoragePool", key_id=7, state="queued")
    assert key_of(volume) == OrderingKey("StoragePool", 7)
    assert key_of(task(1, vm=3)) == OrderingKey("Vm", 3)


def test_key_of_falls_back_to_target_type() -> None:
    row = TaskRow(id=1, target_type="Vm", target_id=3, action="start_vm", args={}, key_type=None, key_id=3,
                  state="queued")
    assert key_of(row) == OrderingKey("Vm", 3)


def test_route_uses_shard_for() -> None:
    d = Dispatcher(shards=4, window=2)
    for vm in range(1, 50):
        slot = d.route(task(vm, vm=vm))
        assert slot == shard_for(OrderingKey("Vm", vm), 4)
        assert d.slots[slot].backlog[-1].id == vm


def test_volume_work_routes_with_its_pool() -> None:
    d = Dispatcher(shards=8, window=2)
    pool = TaskRow(id=1, target_type="StoragePool", target_id=7, action="refresh_pool", args={},
                   key_type="StoragePool", key_id=7, state="queued")
    volume = TaskRow(id=2, target_type="StorageVolume", target_id=99, action="create_volume", args={},
                     key_type="StoragePool", key_id=7, state="queued")
    assert d.route(pool) == d.route(volume)


def test_same_key_keeps_arrival_order_in_one_slot() -> None:
    d = Dispatcher(shards=4, window=8)
    slots = {d.route(task(i, vm=5)) for i in (3, 8, 11)}
    assert len(slots) == 1
    (slot,) = slots
    assert backlog_ids(d, slot) == [3, 8, 11]


# -- the window --------------------------------------------------------------------


def test_take_sendable_respects_the_window() -> None:
    d = Dispatcher(shards=1, window=3)
    for i in range(1, 8):
        d.route(task(i, vm=i))
    assert ids(d.take_sendable(0)) == [1, 2, 3]
    assert d.take_sendable(0) == []  # window full
    assert list(d.slots[0].sent) == [1, 2, 3]
    assert backlog_ids(d, 0) == [4, 5, 6, 7]
    assert d.held() == 7


def test_ended_frees_room_for_one_more() -> None:
    d = Dispatcher(shards=1, window=2)
    for i in range(1, 6):
        d.route(task(i))
    assert ids(d.take_sendable(0)) == [1, 2]
    d.ended(0, 1)
    assert ids(d.take_sendable(0)) == [3]
    assert d.take_sendable(0) == []
    d.ended(0, 2)
    d.ended(0, 3)
    assert ids(d.take_sendable(0)) == [4, 5]
    assert d.take_sendable(0) == []
    assert d.held() == 2


def test_ended_of_unknown_task_is_harmless() -> None:
    d = Dispatcher(shards=1, window=2)
    d.route(task(1))
    d.take_sendable(0)
    d.ended(0, 99)
    assert list(d.slots[0].sent) == [1]


def test_windows_are_per_slot() -> None:
    a, b = vms_on_distinct_slots(4, 2)
    d = Dispatcher(shards=4, window=1)
    slot_a, slot_b = d.route(task(1, vm=a)), d.route(task(2, vm=b))
    d.route(task(3, vm=a))
    assert ids(d.take_sendable(slot_a)) == [1]
    assert ids(d.take_sendable(slot_b)) == [2]
    assert d.take_sendable(slot_a) == []
    d.ended(slot_b, 2)
    assert d.take_sendable(slot_a) == []  # another slot's end frees nothing here
    d.ended(slot_a, 1)
    assert ids(d.take_sendable(slot_a)) == [3]


def test_empty_slot_sends_nothing() -> None:
    d = Dispatcher(shards=3, window=4)
    assert [d.take_sendable(i) for i in range(3)] == [[], [], []]
    assert d.held() == 0
    assert d.in_hand() == set()


# -- unsend ------------------------------------------------------------------------


def test_unsend_puts_back_at_the_front_in_order() -> None:
    d = Dispatcher(shards=1, window=4)
    for i in range(1, 8):
        d.route(task(i))
    batch = d.take_sendable(0)
    assert ids(batch) == [1, 2, 3, 4]
    d.unsend(0, batch[1:])  # task 1 went out, 2..4 did not
    assert list(d.slots[0].sent) == [1]
    assert backlog_ids(d, 0) == [2, 3, 4, 5, 6, 7]
    assert ids(d.take_sendable(0)) == [2, 3, 4]
    assert list(d.slots[0].sent) == [1, 2, 3, 4]


def test_unsend_everything() -> None:
    d = Dispatcher(shards=1, window=2)
    for i in (10, 20, 30):
        d.route(task(i))
    batch = d.take_sendable(0)
    d.unsend(0, batch)
    assert d.slots[0].sent == {}
    assert backlog_ids(d, 0) == [10, 20, 30]
    assert d.held() == 3


# -- a shard is replaced -----------------------------------------------------------


def test_shard_connected_returns_what_a_dead_shard_lost() -> None:
    d = Dispatcher(shards=1, window=3)
    for i in range(1, 6):
        d.route(task(i))
    d.take_sendable(0)
    d.ended(0, 1)
    lost = d.shard_connected(0, held=set())
    assert ids(lost) == [2, 3]
    assert d.slots[0].sent == {}
    assert backlog_ids(d, 0) == [4, 5]  # untouched until requeued


def test_requeue_puts_lost_tasks_first_in_id_order() -> None:
    d = Dispatcher(shards=1, window=3)
    for i in range(1, 7):
        d.route(task(i, vm=1 + i % 2))
    assert ids(d.take_sendable(0)) == [1, 2, 3]
    lost = d.shard_connected(0, held=set())
    d.requeue(0, [task(i, vm=1 + i % 2, state="running" if i == 1 else "queued") for i in reversed(lost)])
    assert backlog_ids(d, 0) == [1, 2, 3, 4, 5, 6]
    first = d.take_sendable(0)
    assert ids(first) == [1, 2, 3]
    assert first[0].state == "running"  # the interrupted one goes out first, to be reconciled


def test_requeued_task_runs_ahead_of_later_tasks_of_its_key() -> None:
    d = Dispatcher(shards=2, window=1)
    slot = d.route(task(5, vm=9))
    assert ids(d.take_sendable(slot)) == [5]
    d.route(task(6, vm=9))
    d.route(task(7, vm=9))
    lost = d.shard_connected(slot, held=set())
    d.requeue(slot, [task(i, vm=9, state="running") for i in lost])
    out = d.take_sendable(slot)
    assert ids(out) == [5]
    assert out[0].state == "running"
    assert backlog_ids(d, slot) == [6, 7]


def test_requeue_drops_what_the_caller_leaves_out() -> None:
    # The caller drops tasks the database says have ended (Fetcher._resync).
    d = Dispatcher(shards=1, window=3)
    for i in range(1, 5):
        d.route(task(i))
    d.take_sendable(0)
    lost = d.shard_connected(0, held=set())
    d.requeue(0, [task(i) for i in lost if i != 1])
    assert backlog_ids(d, 0) == [2, 3, 4]
    assert d.in_hand() == {2, 3, 4}


def test_shard_connected_keeps_what_the_shard_still_holds() -> None:
    d = Dispatcher(shards=1, window=4)
    for i in range(1, 6):
        d.route(task(i))
    d.take_sendable(0)
    lost = d.shard_connected(0, held={3, 4})
    assert ids(lost) == [1, 2]
    assert set(d.slots[0].sent) == {3, 4}
    assert d.slots[0].sent[3] is not None


def test_shard_connected_adopts_unknown_held_tasks() -> None:
    # After a fetcher restart the shard reports tasks this fetcher never saw;
    # they occupy the window until they end.
    d = Dispatcher(shards=1, window=2)
    for i in (10, 11, 12):
        d.route(task(i))
    assert d.shard_connected(0, held={7, 8}) == []
    assert d.slots[0].sent == {7: None, 8: None}
    assert d.in_hand() == {7, 8, 10, 11, 12}
    assert d.take_sendable(0) == []
    d.ended(0, 7)
    assert ids(d.take_sendable(0)) == [10]
    assert d.slots[0].sent == {8: None, 10: task(10)}


def test_held_tasks_of_a_dead_shard_are_not_forgotten_after_fetcher_restart() -> None:
    d = Dispatcher(shards=1, window=8)
    assert d.shard_connected(0, held={7, 8}) == []  # new fetcher; the shard reports 7 and 8
    lost = d.shard_connected(0, held=set())  # that shard died; its successor holds nothing
    reported = {getattr(t, "id", t) for t in lost} | d.in_hand()
    assert {7, 8} <= reported


def test_shard_connected_touches_only_its_slot() -> None:
    a, b = vms_on_distinct_slots(4, 2)
    d = Dispatcher(shards=4, window=2)
    slot_a, slot_b = d.route(task(1, vm=a)), d.route(task(2, vm=b))
    d.take_sendable(slot_a)
    d.take_sendable(slot_b)
    assert ids(d.shard_connected(slot_a, held=set())) == [1]
    assert list(d.slots[slot_b].sent) == [2]


# -- drain and counts --------------------------------------------------------------


def test_returned_frees_the_window_without_requeueing() -> None:
    d = Dispatcher(shards=1, window=3)
    for i in range(1, 6):
        d.route(task(i))
    d.take_sendable(0)
    d.ended(0, 1)
    d.returned(0, (2, 3))
    assert d.slots[0].sent == {}
    assert backlog_ids(d, 0) == [4, 5]
    assert d.in_hand() == {4, 5}
    assert d.held() == 2


def test_in_hand_and_held_count_backlog_and_sent() -> None:
    vms = vms_on_one_slot(3, 2) + vms_on_distinct_slots(3, 3)
    d = Dispatcher(shards=3, window=1)
    for i, vm in enumerate(vms, start=1):
        d.route(task(i, vm=vm))
    for slot in range(3):
        d.take_sendable(slot)
    assert d.in_hand() == set(range(1, len(vms) + 1))
    assert d.held() == len(vms)
    assert sum(len(s.sent) for s in d.slots) == 3
    assert sum(s.held for s in d.slots) == d.held()


@pytest.mark.parametrize("window", [1, 2, 5])
def test_full_cycle_ends_everything_in_order(window: int) -> None:
    d = Dispatcher(shards=2, window=window)
    for i in range(1, 21):
        d.route(task(i, vm=1 + i % 3))
    ran: list[int] = []
    while d.held():
        for slot in range(2):
            for t in d.take_sendable(slot):
                ran.append(t.id)
                d.ended(slot, t.id)
    for vm in (1, 2, 3):
        mine = [i for i in ran if 1 + i % 3 == vm]
        assert mine == sorted(mine)
    assert sorted(ran) == list(range(1, 21))


def test_held_task_adopted_into_the_backlog_is_left_to_the_shard_holding_it() -> None:
    # A busy shard reconnected after the fetcher adopted copies of what it holds.
    d = Dispatcher(shards=1, window=8)
    for i in (1, 2, 3):
        d.route(task(i))
    assert d.shard_connected(0, held={1, 2}) == []
    assert backlog_ids(d, 0) == [3]
    assert set(d.slots[0].sent) == {1, 2}
