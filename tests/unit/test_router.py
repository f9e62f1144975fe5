"""The router: a stable hash of the ordering key picks the shard slot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from taskomatic.model import OrderingKey
from taskomatic.runtime.router import shard_for

REPO_ROOT = Path(__file__).resolve().parents[2]

KINDS = ("Vm", "StoragePool", "Host")


def _sample_keys() -> list[OrderingKey]:
    keys = [OrderingKey(kind, ident) for kind in KINDS for ident in range(60)]
    keys += [OrderingKey("Vm", 10**12 + i) for i in range(15)]
    keys += [OrderingKey("Vm", None), OrderingKey("Host", None), OrderingKey("StoragePool", -1)]
    keys += [OrderingKey("Vm", 2**62)]
    return keys


SHARD_COUNTS = (1, 2, 3, 4, 7, 8, 16, 64)

_CHILD = """
import json, sys
from taskomatic.model import OrderingKey
from taskomatic.runtime.router import shard_for
keys = json.loads(sys.stdin.read())
print(json.dumps([[shard_for(OrderingKey(k, i), n) for n in {counts!r}] for k, i in keys]))
"""


def test_ordering_key_text_names_kind_and_id() -> None:
    assert str(OrderingKey("Vm", 12)) == "Vm:12"
    assert str(OrderingKey("StoragePool", 2)) == "StoragePool:2"


def test_ordering_key_is_a_value() -> None:
    assert OrderingKey("Vm", 1) == OrderingKey("Vm", 1)
    assert OrderingKey("Vm", 1) != OrderingKey("Host", 1)
    assert len({OrderingKey("Vm", 1), OrderingKey("Vm", 1), OrderingKey("Vm", 2)}) == 2


@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_result_is_a_valid_slot(shards: int) -> None:
    for key in _sample_keys():
        slot = shard_for(key, shards)
        assert isinstance(slot, int)
        assert 0 <= slot < shards, (key, shards, slot)


def test_one_shard_takes_everything() -> None:
    assert {shard_for(key, 1) for key in _sample_keys()} == {0}


@pytest.mark.parametrize("shards", [0, -1, -8])
def test_fewer_than_one_shard_is_refused(shards: int) -> None:
    with pytest.raises(ValueError):
        shard_for(OrderingKey("Vm", 1), shards)


def test_same_key_same_slot_every_call() -> None:
    for key in _sample_keys():
        assert shard_for(key, 8) == shard_for(OrderingKey(key.kind, key.ident), 8)


def test_kind_is_part_of_the_key() -> None:
    # Vm 5 and StoragePool 5 are different resources; over many ids at least some
    # must land on different slots (a hash of the id alone would never differ).
    differing = sum(shard_for(OrderingKey("Vm", i), 8) != shard_for(OrderingKey("StoragePool", i), 8)
                    for i in range(200))
    assert differing > 100


@pytest.mark.parametrize("seed", ["1", "4242"])
def test_stable_across_processes_with_different_hash_seeds(seed: str) -> None:
    keys = _sample_keys()
    assert len(keys) >= 190
    expected = [[shard_for(key, n) for n in SHARD_COUNTS] for key in keys]
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD.format(counts=SHARD_COUNTS)],
        input=json.dumps([[k.kind, k.ident] for k in keys]),
        capture_output=True, text=True, check=True, env=env, cwd=REPO_ROOT, timeout=60,
    )
    assert json.loads(result.stdout) == expected


def test_hash_seeds_really_differ_in_children() -> None:
    """Guard for the test above: the two seeds do salt ``hash()`` differently."""
    code = "print(hash('Vm:1'))"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60).stdout
        for seed in ("1", "4242")
    }
    assert len(outputs) == 2


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_vm_keys_spread_evenly(shards: int) -> None:
    counts = Counter(shard_for(OrderingKey("Vm", i), shards) for i in range(1, 10_001))
    mean = 10_000 / shards
    assert set(counts) == set(range(shards))
    for slot, count in counts.items():
        assert abs(count - mean) <= 0.2 * mean, (slot, count, mean)


def test_pool_keys_spread_evenly() -> None:
    counts = Counter(shard_for(OrderingKey("StoragePool", i), 8) for i in range(1, 10_001))
    mean = 10_000 / 8
    assert all(abs(counts[slot] - mean) <= 0.2 * mean for slot in range(8)), counts


# -- routing strategies ------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2, 3, 8])
def test_hash_routing_sends_partition_p_to_shard_p_mod_n(shards: int) -> None:
    from taskomatic.partitions import DEFAULT_PARTITIONS, partition_of
    from taskomatic.runtime.router import make_routing

    routing = make_routing("hash", shards)
    for key in _sample_keys():
        assert routing.home(key) == partition_of(key, DEFAULT_PARTITIONS) % shards
    homes = Counter(routing.home(OrderingKey("Vm", i)) for i in range(1, 10_001))
    assert set(homes) == set(range(shards))
    assert all(abs(n - 10_000 / shards) <= 0.1 * 10_000 / shards for n in homes.values()), homes


def test_hash_routing_refuses_no_shards() -> None:
    from taskomatic.runtime.router import HashRouting

    with pytest.raises(ValueError):
        HashRouting(0, 256)


def test_an_ordering_key_reads_as_kind_colon_id_and_hashes_as_a_tuple() -> None:
    """shard_for hashes str(key), so its text is part of the routing; the dispatcher hashes and compares
    keys about 25 times per task, which a tuple does in C (a dataclass ran generated Python for each)."""
    key = OrderingKey("StoragePool", 2)
    assert str(key) == f"{key}" == "StoragePool:2" and str(OrderingKey("Vm", None)) == "Vm:None"
    assert (key.kind, key.ident) == ("StoragePool", 2)
    assert OrderingKey.__hash__ is tuple.__hash__ and OrderingKey.__eq__ is tuple.__eq__
    assert key == OrderingKey("StoragePool", 2) and hash(key) == hash(OrderingKey("StoragePool", 2))
    assert key != OrderingKey("StoragePool", 3) and key != OrderingKey("Vm", 2)
    assert sorted([OrderingKey("Vm", 3), OrderingKey("Host", 9), OrderingKey("Vm", 1)]) == [
        OrderingKey("Host", 9), OrderingKey("Vm", 1), OrderingKey("Vm", 3)]
