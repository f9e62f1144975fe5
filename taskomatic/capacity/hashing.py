"""The planner's model of ``--routing hash``: every shard its own M/G/1 queue.

With hash routing a key's partition p = stable_hash(key) mod P always runs on shard p mod N, whatever its
load (``taskomatic/runtime/router.py``, ``HashRouting``). So the shards are not a pool: shard j is a single
server fed only by the keys that hash to it, an M/G/1 queue of rate λ_j = the sum of those keys' rates
(Pollaczek-Khinchine mean with the planner's exponential tail, ``mgc_wait(1, ...)``). A key's tasks already
run one at a time on their one shard, so a task waits for its shard's queue only (no separate per-key wait
on top, unlike pinned routing's pool + own queue). The busiest shard sets the answer: every shard's p95
must meet the target, and the hottest key can make its shard the busiest whatever N is.

Keys are the planner's: VM ids (modelled, ``Vm:<id>``) or the measured keys' labels (``Type:id``), hashed
exactly as the database does (``taskomatic.partitions.partition_of``). A label that does not parse as
``Type:id`` is taken as spread evenly over the shards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from taskomatic.capacity.queueing import Service, Wait, mgc_wait, solve_quantile
from taskomatic.model import OrderingKey
from taskomatic.partitions import DEFAULT_PARTITIONS, partition_of

HASH_MODEL_NAME = ("hash routing: one M/G/1 queue per shard (Pollaczek-Khinchine) fed by the partitions "
                   "p = hash(key) mod P with p mod N = the shard, exponential-tail p95")


def ordering_key(key: Any) -> OrderingKey | None:
    """A planner key as the daemon's ordering key: a VM id, or a "Type:id" label; None if it is neither."""
    if isinstance(key, int):
        return OrderingKey("Vm", key)
    kind, sep, ident = str(key).rpartition(":")
    if not sep or not kind:
        return None
    try:
        return OrderingKey(kind, int(ident))
    except ValueError:
        return None


class PartitionRates:
    """Tasks/s per partition (and what cannot be placed), summed once; any shard count is then cheap."""

    def __init__(self, rates: Mapping[Any, float], partitions: int = DEFAULT_PARTITIONS) -> None:
        self.partitions = partitions
        self.per_partition = [0.0] * partitions
        self.unplaced = 0.0  # keys whose label is not "Type:id": spread evenly over the shards
        self.partition_of_key: dict[Any, int | None] = {}
        for key, rate in rates.items():
            parsed = ordering_key(key)
            p = None if parsed is None else partition_of(parsed, partitions)
            self.partition_of_key[key] = p
            if p is None:
                self.unplaced += rate
            else:
                self.per_partition[p] += rate

    def shard_rates(self, shards: int) -> list[float]:
        """λ_j of each shard j: the partitions p with p mod N = j."""
        out = [self.unplaced / shards] * shards
        for p, rate in enumerate(self.per_partition):
            out[p % shards] += rate
        return out

    def shard_of(self, key: Any, shards: int) -> int | None:
        p = self.partition_of_key.get(key)
        return None if p is None else p % shards


def shard_waits(rates: list[float], service: Service) -> list[Wait | None]:
    """Each shard's M/G/1 wait; None for a shard at utilisation >= 1."""
    return [mgc_wait(1, rate, service) for rate in rates]


def mixed_p95(shares: list[float], waits: list[Wait | None]) -> float | None:
    """The p95 of a task drawn from shards by ``shares`` (None if a shard with a share is overloaded)."""
    used = [(share, wait) for share, wait in zip(shares, waits, strict=True) if share > 0]
    if any(wait is None for _, wait in used):
        return None
    total = sum(share for share, _ in used)
    if total <= 0:
        return 0.0
    return solve_quantile(lambda t: sum(share * w.tail(t) for share, w in used if w is not None) / total)


def mixed_mean(shares: list[float], waits: list[Wait | None]) -> float | None:
    used = [(share, wait) for share, wait in zip(shares, waits, strict=True) if share > 0]
    if any(wait is None for _, wait in used):
        return None
    total = sum(share for share, _ in used)
    return sum(share * w.mean_s for share, w in used if w is not None) / total if total > 0 else 0.0


def key_shard_shares(placed: PartitionRates, weights: Mapping[Any, float], shards: int) -> list[float]:
    """How ``weights`` (tasks per key, e.g. one action's) fall on the shards; unplaced keys spread evenly."""
    shares = [0.0] * shards
    for key, weight in weights.items():
        shard = placed.shard_of(key, shards)
        if shard is None:
            for j in range(shards):
                shares[j] += weight / shards
        else:
            shares[shard] += weight
    return shares


def busiest(rates: list[float]) -> int:
    return max(range(len(rates)), key=lambda j: rates[j])


def utilisation(rates: list[float], service: Service) -> float:
    return max(rates) * service.mean_s if rates else math.inf
