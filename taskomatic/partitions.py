"""Partitions: every ordering key belongs to one of P fixed partitions, the unit of ownership.

``partition_of(key, P) = key_hash(key) mod P``. The hash is computed the same
way here and in the database (``taskomatic_key_hash`` in migration 0008, which
the tasks insert trigger uses to fill ``tasks.partition``), so every process
of every instance agrees. It is never Python's ``hash()``, which is salted per
process. The definition, for anyone who needs to compute it elsewhere:

1. FNV-1a, 32 bits (offset basis 2166136261, prime 16777619), over the UTF-8
   bytes of the key type followed by the key id as 8 bytes, little-endian,
   two's complement;
2. then MurmurHash3's 32-bit finalizer (``fmix32``), so that the low bits,
   which ``mod P`` keeps, depend on every input bit (FNV's alone do not mix
   well enough for consecutive ids).

P itself lives in the database (``cluster_settings.partitions``, 256 by
default; see docs/partitions.md for why), never in a config file: instances
with different values would disagree about who owns a key.

``balance`` is the pure half of multihost partition ownership: given the live
instances and who holds what, which partitions this instance should acquire
and which it should hand over, so that each live instance holds P/n (give or
take one) and only the partitions that must move, move.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from taskomatic.model import OrderingKey

# The default P (migration 0008 records it in the database; read it from there).
DEFAULT_PARTITIONS = 256

_FNV_OFFSET = 2166136261
_FNV_PRIME = 16777619
_MASK32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def key_hash(key_type: str, key_id: int) -> int:
    """The stable 32-bit hash of an ordering key (the database's ``taskomatic_key_hash``)."""
    if not -(2**63) <= key_id < 2**63:
        raise ValueError(f"key id {key_id} does not fit a bigint")
    h = _FNV_OFFSET
    for byte in key_type.encode("utf-8") + key_id.to_bytes(8, "little", signed=True):
        h = ((h ^ byte) * _FNV_PRIME) & _MASK32
    return _fmix32(h)


def partition_of(key: OrderingKey, partitions: int) -> int:
    """The partition in [0, partitions) of an ordering key.

    A key without an id (never stored: the insert trigger gives every task
    one) counts as id 0, so that routing a malformed row cannot fail.
    """
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    return key_hash(key.kind, key.ident if key.ident is not None else 0) % partitions


# -- balancing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one instance should do about its partitions now."""

    quota: int  # how many it should hold once the instances are balanced
    acquire: tuple[int, ...]  # free ones, a dead holder's, or a live holder's surplus (to ask for)
    release: tuple[int, ...]  # its own beyond its quota: hand them over


def assignment(live: Collection[int], owners: Mapping[int, int | None], partitions: int) -> dict[int, int]:
    """The balanced owner of every partition, moving as few as possible.

    ``live``: the instances whose lease is live; ``owners``: partition ->
    holder (None or absent: free; a holder not in ``live`` counts as free,
    its partitions are taken over). Every instance computes the same answer
    from the same view (deterministic), like the assignor of a Kafka consumer
    group, but without a leader: the giver and the taker agree on what moves.

    Each live instance's quota is P // n, and the P mod n instances that hold
    the most now (ties: lower id) get one more, so no one gives up a partition
    only to make room for another's extra one. An instance over its quota keeps
    its lowest-numbered partitions and gives up the rest; the free, dead and
    given-up partitions go, in partition order, to the instances under their
    quota, in id order. Nothing else moves: an instance within its quota keeps
    everything it holds (cooperative sticky assignment).
    """
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    members = sorted(set(live))
    if not members:
        return {}
    held: dict[int, list[int]] = {i: [] for i in members}
    for partition in range(partitions):
        owner = owners.get(partition)
        if owner in held:
            held[owner].append(partition)
    base, extra = divmod(partitions, len(members))
    by_size = sorted(members, key=lambda i: (-len(held[i]), i))
    quota = {i: base + (1 if rank < extra else 0) for rank, i in enumerate(by_size)}
    target: dict[int, int] = {}
    pool = [p for p in range(partitions) if owners.get(p) not in held]
    for i in members:
        for p in held[i][:quota[i]]:
            target[p] = i
        pool.extend(held[i][quota[i]:])
    pool.sort()
    start = 0
    for i in members:
        need = quota[i] - min(quota[i], len(held[i]))
        for p in pool[start:start + need]:
            target[p] = i
        start += need
    return target


def balance(me: int, live: Collection[int], owners: Mapping[int, int | None], partitions: int) -> Plan:
    """This instance's part of ``assignment``. An instance that is not live gives up everything."""
    mine = tuple(sorted(p for p in range(partitions) if owners.get(p) == me))
    if me not in live:
        return Plan(0, (), mine)
    target = assignment(live, owners, partitions)
    wanted = [p for p, owner in sorted(target.items()) if owner == me]
    return Plan(
        quota=len(wanted),
        acquire=tuple(p for p in wanted if owners.get(p) != me),
        release=tuple(p for p in mine if target.get(p) != me),
    )
