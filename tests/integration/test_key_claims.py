"""The multihost claim protocol's queries on a real PostgreSQL, one scenario each.

Two ``Store`` objects are two database sessions: that is how two instances
(or an instance and a shard) meet. Lease expiry is set with plain SQL, so
no test waits for a clock. The random interleavings are in
tests/property/test_claim_protocol.py; these are the named cases.
"""

from __future__ import annotations

from datetime import UTC, datetime

from taskomatic.db.store import Store
from tests.helpers import execute, query
from tests.integration.conftest import StoreFactory

START = ("", -(2**63) + 1)


def register(store: Store, lease: float = 60.0) -> int:
    with store.transaction():
        instance_id = store.scalar("register_instance", hostname="h", pid=1, version="t", mode="multihost",
                                   shards=2, lease=lease)
    assert isinstance(instance_id, int)
    return instance_id


def submit(store: Store, vm: int | None, count: int = 1) -> list[int]:
    with store.transaction():
        return [store.scalar("submit_task", target_type="Vm", target_id=vm, action="start_vm", args="{}",
                             submitted_by="test") for _ in range(count)]


def expire(dsn: str, instance_id: int) -> None:
    execute(dsn, "UPDATE instances SET lease_expires_at = clock_timestamp() - interval '1 second' WHERE id = %s",
            (instance_id,))


def free(store: Store, after: tuple[str, int] = START, limit: int = 100, max_visit: int = 1000) -> list[int]:
    with store.transaction():
        rows = store.all("free_keys", after_type=after[0], after_id=after[1], max_visit=max_visit, limit=limit)
    return [r["key_id"] for r in rows]


def claim(store: Store, instance_id: int, vms: list[int]) -> dict[int, int]:
    with store.transaction():
        rows = store.all("claim_keys", instance_id=instance_id, key_types=["Vm"] * len(vms), key_ids=vms)
    return {r["key_id"]: r["token"] for r in rows}


def top_up(store: Store, instance_id: int, tokens: dict[int, int], count: int = 10) -> list[int]:
    vms = sorted(tokens)
    with store.transaction():
        rows = store.all("claim_key_tasks", instance_id=instance_id, key_types=["Vm"] * len(vms), key_ids=vms,
                         tokens=[tokens[v] for v in vms], counts=[count] * len(vms))
    return sorted(r["id"] for r in rows)


def test_free_keys_lists_each_key_with_unclaimed_work_once_skipping_claimed_ones(stores: StoreFactory) -> None:
    store = stores()
    a = register(store)
    for vm in (5, 1, 3, 2, 4):
        submit(store, vm, count=3)
    assert free(store) == [1, 2, 3, 4, 5]
    claim(store, a, [2, 4])
    assert free(store) == [1, 3, 5]
    assert free(store, after=("Vm", 1)) == [3, 5]  # the rotating start point
    assert free(store, limit=2) == [1, 3]
    assert free(store, max_visit=2) == [1]  # visits keys 1 and 2 (held), then stops


def test_a_task_without_target_gets_a_key_of_its_own(stores: StoreFactory) -> None:
    store = stores()
    first, second = submit(store, None, count=2)
    keys = query(store_dsn(store), "SELECT id, key_id FROM tasks ORDER BY id")
    assert [(r["id"], r["key_id"]) for r in keys] == [(first, -first), (second, -second)]
    assert free(store) == [-second, -first]


def store_dsn(store: Store) -> str:
    return str(store.conn.dsn)


def test_two_instances_never_win_the_same_key(stores: StoreFactory) -> None:
    one, two = stores(), stores()
    a, b = register(one), register(two)
    for vm in range(1, 6):
        submit(one, vm)
    won_a = claim(one, a, [1, 2, 3])
    won_b = claim(two, b, [3, 4, 5])
    assert set(won_a) == {1, 2, 3} and set(won_b) == {4, 5}
    assert len(set(won_a.values()) | set(won_b.values())) == 5  # every claim has its own token


def test_tasks_come_oldest_first_and_only_under_our_token_and_lease(stores: StoreFactory) -> None:
    store = stores()
    dsn = store_dsn(store)
    a = register(store)
    ids = submit(store, 7, count=5)
    tokens = claim(store, a, [7])
    assert top_up(store, a, {7: tokens[7] + 1}) == []  # not our token
    assert top_up(store, a, tokens, count=2) == ids[:2]
    expire(dsn, a)
    assert top_up(store, a, tokens) == []  # lease ran out
    with store.transaction():
        assert store.one("renew_lease", instance_id=a, lease=60.0) is None  # and cannot be renewed


def test_takeover_waits_for_the_lease_gives_a_new_token_and_brings_the_tasks(stores: StoreFactory) -> None:
    one, two = stores(), stores()
    dsn = store_dsn(one)
    a, b = register(one), register(two)
    ids = submit(one, 9, count=4)
    tokens = claim(one, a, [9])
    assert top_up(one, a, tokens, count=2) == ids[:2]
    with one.transaction():
        assert one.one("hold_key_claim", key_type="Vm", key_id=9, instance_id=a, token=tokens[9])
        assert one.one("mark_running", shard=0, task_ids=[ids[0]], instance_id=a, time_started=datetime.now(UTC))
    with two.transaction():
        assert two.all("take_over_keys", instance_id=b, limit=10) == []  # a's lease is live
    expire(dsn, a)
    with two.transaction():
        taken = two.all("take_over_keys", instance_id=b, limit=10)
        assert [(r["key_id"], r["previous"]) for r in taken] == [(9, a)]
        assert taken[0]["token"] > tokens[9]
        moved = two.all("adopt_key_tasks", instance_id=b, key_types=["Vm"], key_ids=[9], previous=[a])
    assert sorted((r["id"], r["state"]) for r in moved) == [(ids[0], "running"), (ids[1], "queued")]
    # The old holder's late writes are refused: the claim is not its own any more.
    with one.transaction():
        assert one.one("hold_key_claim", key_type="Vm", key_id=9, instance_id=a, token=tokens[9]) is None
        assert one.one("record_outcome", task_id=ids[0], instance_id=a, state="finished", message=None,
                       time_started=None, time_ended=datetime.now(UTC)) is None
    assert top_up(two, b, {9: taken[0]["token"]}) == ids[2:]


def test_a_write_in_progress_holds_off_a_takeover_until_it_commits(stores: StoreFactory) -> None:
    one, two = stores(), stores()
    dsn = store_dsn(one)
    a, b = register(one), register(two)
    submit(one, 3)
    tokens = claim(one, a, [3])
    expire(dsn, a)
    execute(dsn, "UPDATE instances SET lease_expires_at = clock_timestamp() + interval '1 hour' WHERE id = %s",
            (a,))
    with one.transaction():
        assert one.one("hold_key_claim", key_type="Vm", key_id=3, instance_id=a, token=tokens[3])
        expire(dsn, a)  # the lease runs out while the write's transaction is open
        with two.transaction():
            assert two.all("take_over_keys", instance_id=b, limit=10) == []  # skipped, not waited for
    with two.transaction():
        assert [r["key_id"] for r in two.all("take_over_keys", instance_id=b, limit=10)] == [3]


def test_an_instance_without_a_live_lease_claims_nothing(stores: StoreFactory) -> None:
    store = stores()
    a, b = register(store), register(store)
    submit(store, 1)
    tokens = claim(store, a, [1])
    expire(store_dsn(store), a)
    expire(store_dsn(store), b)
    assert claim(store, b, [2]) == {}
    with store.transaction():
        assert store.all("take_over_keys", instance_id=b, limit=10) == []
    assert tokens


def test_release_hands_back_unstarted_tasks_and_only_our_claims(stores: StoreFactory) -> None:
    one, two = stores(), stores()
    dsn = store_dsn(one)
    a, b = register(one), register(two)
    ids = submit(one, 4, count=3) + submit(one, 5)
    tokens_a = claim(one, a, [4])
    tokens_b = claim(two, b, [5])
    assert top_up(one, a, tokens_a) == ids[:3]
    with one.transaction():  # someone else's claim is not ours to release
        one.run("release_keys", instance_id=a, key_types=["Vm"], key_ids=[5], tokens=[tokens_b[5]])
        one.run("release_keys", instance_id=a, key_types=["Vm"], key_ids=[4], tokens=[tokens_a[4]])
    claims = query(dsn, "SELECT key_id, instance_id FROM key_claims ORDER BY key_id")
    assert [(r["key_id"], r["instance_id"]) for r in claims] == [(5, b)]
    assert query(dsn, "SELECT count(*) AS n FROM tasks WHERE claimed_by IS NOT NULL")[0]["n"] == 0
    assert free(one) == [4]


def test_graceful_leave_keeps_only_claims_with_a_running_task_and_ends_the_lease(stores: StoreFactory) -> None:
    one, two = stores(), stores()
    dsn = store_dsn(one)
    a, b = register(one), register(two)
    ids = submit(one, 1, count=2) + submit(one, 2)
    tokens = claim(one, a, [1, 2])
    top_up(one, a, tokens)
    with one.transaction():  # a parked task (clear_vms waiting for its children) stays running
        one.one("mark_running", shard=0, task_ids=[ids[0]], instance_id=a, time_started=datetime.now(UTC))
    with one.transaction():
        one.run("release_unstarted", instance_id=a)
        one.run("release_idle_keys", instance_id=a)
        one.run("end_lease", instance_id=a)
        one.run("instance_stopped", instance_id=a)
    assert [r["key_id"] for r in query(dsn, "SELECT key_id FROM key_claims")] == [1]
    with two.transaction():
        taken = two.all("take_over_keys", instance_id=b, limit=10)
        moved = two.all("adopt_key_tasks", instance_id=b, key_types=["Vm"], key_ids=[1], previous=[a])
    assert [r["key_id"] for r in taken] == [1]
    assert [(r["id"], r["state"]) for r in moved] == [(ids[0], "running")]


def test_tasks_left_by_a_standalone_instance_become_claims_to_take_over(stores: StoreFactory) -> None:
    store = stores()
    dsn = store_dsn(store)
    with store.transaction():
        old = store.scalar("register_instance", hostname="h", pid=1, version="t", mode="standalone", shards=1,
                           lease=None)
        ids = submit(store, 6, count=2)
        store.all("claim_tasks", instance_id=old, limit=10)
    with store.transaction():
        store.run("key_claims_for_standalone_leftovers")
    assert [(r["key_id"], r["instance_id"]) for r in query(dsn, "SELECT key_id, instance_id FROM key_claims")] \
        == [(6, old)]
    b = register(store)
    with store.transaction():
        taken = store.all("take_over_keys", instance_id=b, limit=10)
        moved = store.all("adopt_key_tasks", instance_id=b, key_types=["Vm"], key_ids=[6], previous=[old])
    assert [r["previous"] for r in taken] == [old]
    assert sorted(r["id"] for r in moved) == ids


def test_a_top_up_in_flight_holds_off_a_takeover_so_its_tasks_are_not_stranded(stores: StoreFactory) -> None:
    import threading

    from tests.helpers import wait_for

    one, two, blocker = stores(), stores(), stores()
    dsn = store_dsn(one)
    a, b = register(one), register(two)
    ids = submit(one, 8, count=3)
    tokens = claim(one, a, [8])
    # A row lock on the key's first task stands in for a slow top-up: it waits inside its UPDATE.
    with blocker.conn.cursor() as cur:
        cur.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (ids[0],))
    loaded: list[int] = []
    pid = one.conn.get_backend_pid()
    thread = threading.Thread(target=lambda: loaded.extend(top_up(one, a, tokens)))
    thread.start()
    try:
        wait_for(lambda: query(dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
                               (pid,)), 10, 0.02, "the top-up to wait")
        expire(dsn, a)  # its lease runs out meanwhile
        with two.transaction():
            assert two.all("take_over_keys", instance_id=b, limit=10) == []  # the claim is in use: skipped
    finally:
        blocker.rollback()
        thread.join(10)
    assert loaded == ids
    with two.transaction():
        taken = two.all("take_over_keys", instance_id=b, limit=10)
        moved = two.all("adopt_key_tasks", instance_id=b, key_types=["Vm"], key_ids=[8], previous=[a])
    assert [r["key_id"] for r in taken] == [8]
    assert sorted(r["id"] for r in moved) == ids  # nothing left claimed by the expired instance
