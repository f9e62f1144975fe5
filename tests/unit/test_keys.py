"""The multihost fetcher's key book: capacity, top-ups, drained keys."""

from __future__ import annotations

from taskomatic.model import OrderingKey, TaskRow
from taskomatic.runtime.keys import KeyBook


def vm(ident: int) -> OrderingKey:
    return OrderingKey("Vm", ident)


def task(task_id: int, vm_id: int) -> TaskRow:
    return TaskRow(id=task_id, target_type="Vm", target_id=vm_id, action="start_vm", args={},
                   key_type="Vm", key_id=vm_id, state="queued", token=1)


def test_choose_free_takes_the_first_offered_up_to_the_capacity() -> None:
    book = KeyBook(shards=2, keys_per_shard=2, tasks_per_key=4)
    candidates = [vm(i) for i in range(1, 40)]
    chosen = book.choose_free(candidates)
    assert chosen == [vm(1), vm(2), vm(3), vm(4)]  # shards x keys_per_shard, in the order offered
    for key in chosen:
        book.hold(key, 7)
    assert book.key_room() == 0
    assert book.choose_free([vm(i) for i in range(40, 80)]) == []


def test_choose_free_skips_keys_already_held() -> None:
    book = KeyBook(shards=1, keys_per_shard=3, tasks_per_key=4)
    book.hold(vm(1), 5)
    assert book.choose_free([vm(1), vm(2), vm(3), vm(4)]) == [vm(2), vm(3)]


def test_a_new_key_is_topped_up_then_released_when_its_queue_is_empty() -> None:
    book = KeyBook(shards=2, keys_per_shard=1, tasks_per_key=4)
    book.hold(vm(1), 11)
    asked = book.wanting_tasks()
    assert asked == [(vm(1), 11, 4)]
    book.add(task(100, 1))
    book.add(task(101, 1))
    book.topped_up(asked, {vm(1): 2})  # fewer than asked: the queue is empty for now
    assert book.wanting_tasks() == [] and book.drained() == []
    book.ended(100)
    book.ended(101)
    assert book.drained() == [(vm(1), 11)]
    book.release([vm(1)])
    assert book.keys == {} and book.task_keys == {}


def test_a_key_is_topped_up_only_at_half_its_allowance() -> None:
    book = KeyBook(shards=1, keys_per_shard=1, tasks_per_key=4)
    book.hold(vm(1), 1)
    for task_id in (1, 2, 3, 4):
        book.add(task(task_id, 1))
    book.topped_up([(vm(1), 1, 4)], {vm(1): 4})
    assert book.wanting_tasks() == []
    book.ended(1)
    assert book.wanting_tasks() == []
    book.ended(2)
    assert book.wanting_tasks() == [(vm(1), 1, 2)]


def test_new_tasks_make_an_empty_key_worth_asking_again() -> None:
    book = KeyBook(shards=1, keys_per_shard=1, tasks_per_key=4)
    book.hold(vm(1), 1)
    book.topped_up([(vm(1), 1, 4)], {})
    assert book.drained() == [(vm(1), 1)]
    book.queue_changed()
    assert book.drained() == [] and book.wanting_tasks() == [(vm(1), 1, 4)]


def test_tasks_are_counted_once_and_only_for_held_keys() -> None:
    book = KeyBook(shards=1, keys_per_shard=2, tasks_per_key=4)
    book.hold(vm(1), 1)
    book.add(task(1, 1))
    book.add(task(1, 1))  # a shard's held task adopted again after a fetcher restart
    book.add(task(2, 2))  # not a held key
    assert book.keys[vm(1)].in_hand == 1 and 2 not in book.task_keys
    book.ended(99)  # unknown: ignored
    assert book.keys[vm(1)].in_hand == 1


def test_a_takeover_token_replaces_an_older_one() -> None:
    book = KeyBook(shards=1, keys_per_shard=1, tasks_per_key=4)
    book.hold(vm(1), 3)
    book.hold(vm(1), 9)
    book.hold(vm(1), 4)
    assert book.token_of(vm(1)) == 9


def test_a_busy_key_is_handed_back_after_its_turn() -> None:
    book = KeyBook(shards=1, keys_per_shard=1, tasks_per_key=2)
    book.hold(vm(1), 1)
    next_id = 1
    while book.wanting_tasks():
        (key, token, count), = book.wanting_tasks()
        for _ in range(count):
            book.add(task(next_id, 1))
            next_id += 1
        book.topped_up([(key, token, count)], {key: count})  # the queue always has more
        for task_id in list(book.task_keys):
            book.ended(task_id)
    assert next_id - 1 == book.turn  # no more than one turn's worth under one claim
    assert book.drained() == [(vm(1), 1)]
    book.hold(vm(1), 2)  # claimed again (a new token): a new turn
    assert book.wanting_tasks() == [(vm(1), 2, 2)]
