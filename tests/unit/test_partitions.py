"""Partitions, pure half: the stable key hash and the balancing of partitions among instances."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskomatic.model import OrderingKey
from taskomatic.partitions import DEFAULT_PARTITIONS, assignment, balance, key_hash, partition_of

REPO_ROOT = Path(__file__).resolve().parents[2]
P = DEFAULT_PARTITIONS

# -- the hash ---------------------------------------------------------------------------------


def test_known_values_pin_the_definition() -> None:
    """The database computes the same function (tests/integration/test_partitions_sql.py): a change
    here without a migration would send every key to another partition."""
    assert key_hash("Vm", 1) == 736150550
    assert key_hash("StoragePool", 2) == 838237898
    assert key_hash("Host", -7) == 1264901185
    assert partition_of(OrderingKey("Vm", 1), 256) == 736150550 % 256


def test_the_kind_is_part_of_the_key() -> None:
    differing = sum(partition_of(OrderingKey("Vm", i), P) != partition_of(OrderingKey("StoragePool", i), P)
                    for i in range(1000))
    assert differing > 950


@pytest.mark.parametrize("kind", ["Vm", "StoragePool", "Host"])
def test_consecutive_ids_spread_evenly_over_the_partitions(kind: str) -> None:
    counts = Counter(partition_of(OrderingKey(kind, i), P) for i in range(1, 256 * 200 + 1))
    assert set(counts) == set(range(P))
    # 200 expected per partition; a binomial's spread is about 14, so 25 % is far outside chance.
    assert max(abs(c - 200) for c in counts.values()) <= 50, sorted(counts.values())[:3]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        partition_of(OrderingKey("Vm", 1), 0)
    with pytest.raises(ValueError):
        key_hash("Vm", 2**63)
    assert partition_of(OrderingKey("Vm", None), P) == partition_of(OrderingKey("Vm", 0), P)


@given(kind=st.text(max_size=20), ident=st.integers(-(2**63), 2**63 - 1), partitions=st.integers(1, 32767))
def test_result_is_a_partition(kind: str, ident: int, partitions: int) -> None:
    assert 0 <= partition_of(OrderingKey(kind, ident), partitions) < partitions
    assert 0 <= key_hash(kind, ident) < 2**32


def test_same_in_a_process_with_another_hash_seed() -> None:
    keys = [["Vm", i] for i in range(-50, 200)] + [["StoragePool", 2**62], ["Hôst", 5]]
    expected = [partition_of(OrderingKey(k, i), P) for k, i in keys]
    child = ("import json, sys\nfrom taskomatic.model import OrderingKey\n"
             "from taskomatic.partitions import partition_of\n"
             f"print(json.dumps([partition_of(OrderingKey(k, i), {P}) for k, i in json.load(sys.stdin)]))")
    for seed in ("1", "4242"):
        out = subprocess.run([sys.executable, "-c", child], input=json.dumps(keys), capture_output=True, text=True,
                             check=True, timeout=60, cwd=REPO_ROOT,
                             env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)})
        assert json.loads(out.stdout) == expected


# -- balancing --------------------------------------------------------------------------------


def counts_of(target: dict[int, int]) -> Counter[int]:
    return Counter(target.values())


def test_a_lone_instance_takes_everything() -> None:
    plan = balance(1, [1], {}, P)
    assert plan.quota == P and plan.acquire == tuple(range(P)) and plan.release == ()


def test_a_joining_instance_gets_its_share_from_the_others_surplus_only() -> None:
    owners = {p: 1 if p < 128 else 2 for p in range(P)}
    target = assignment([1, 2, 3], owners, P)
    assert sorted(counts_of(target).values()) == [85, 85, 86]
    moved = [p for p in range(P) if target[p] != owners[p]]
    assert len(moved) == 85 and all(target[p] == 3 for p in moved)
    giver = balance(1, [1, 2, 3], owners, P)
    taker = balance(3, [1, 2, 3], owners, P)
    other = balance(2, [1, 2, 3], owners, P)
    assert set(taker.acquire) == set(giver.release) | set(other.release)
    assert giver.acquire == () and other.acquire == ()


def test_a_dead_instances_partitions_go_to_the_live_ones() -> None:
    owners = {p: (1, 2, 3)[p % 3] for p in range(P)}
    target = assignment([1, 3], owners, P)
    assert counts_of(target) == Counter({1: 128, 3: 128})
    assert all(target[p] == owners[p] for p in range(P) if owners[p] != 2)


def test_a_balanced_group_moves_nothing() -> None:
    owners = {p: (10, 20, 30)[p % 3] for p in range(P)}
    for me in (10, 20, 30):
        plan = balance(me, [10, 20, 30], owners, P)
        assert plan.acquire == () and plan.release == ()


def test_an_instance_that_is_not_live_gives_up_everything() -> None:
    owners = {0: 5, 1: 5, 2: 6}
    assert balance(5, [6], owners, 3).release == (0, 1)
    assert balance(5, [6], owners, 3).acquire == ()


owner_maps = st.dictionaries(st.integers(0, 63), st.one_of(st.none(), st.integers(1, 8)), max_size=64)


@settings(max_examples=300)
@given(live=st.sets(st.integers(1, 6), min_size=1, max_size=6), owners=owner_maps,
       partitions=st.integers(1, 64))
def test_assignment_is_balanced_total_and_moves_only_what_must_move(
        live: set[int], owners: dict[int, int | None], partitions: int) -> None:
    owners = {p: o for p, o in owners.items() if p < partitions}
    target = assignment(live, owners, partitions)
    assert set(target) == set(range(partitions))
    assert set(target.values()) <= live
    sizes = [counts_of(target).get(i, 0) for i in live]
    assert max(sizes) - min(sizes) <= 1
    # Minimal movement: an instance loses partitions only beyond its quota, and only as many as
    # it holds beyond it; a partition of a live instance within its quota never moves.
    for i in live:
        held = [p for p in range(partitions) if owners.get(p) == i]
        kept = [p for p in held if target[p] == i]
        assert len(kept) == min(len(held), counts_of(target)[i])
    # Every instance computes the same plan from the same view, and the plans fit together.
    plans = {i: balance(i, live, owners, partitions) for i in live}
    for i, plan in plans.items():
        assert set(plan.acquire) == {p for p, o in target.items() if o == i and owners.get(p) != i}
        assert set(plan.release) == {p for p, o in owners.items() if o == i and target[p] != i}
    released = {p for plan in plans.values() for p in plan.release}
    acquired = {p for plan in plans.values() for p in plan.acquire}
    free_or_dead = {p for p in range(partitions) if owners.get(p) not in live}
    assert acquired == released | free_or_dead
    # Applying the plan is a fixed point: the next round moves nothing.
    assert assignment(live, target, partitions) == target
