"""Which shard slot a key may run on: the routing strategies, and the old hash fallback.

``PinnedRouting`` and ``HashRouting`` are the two ``routing`` settings the
``Dispatcher`` is built with. ``shard_for`` is the old routing by a CRC of the
key's text, kept for slots of tasks marked before slots were recorded.
Python's ``hash()`` is salted per process, so it would send one key to
different shards in different processes; neither is used here.
"""

from __future__ import annotations

import zlib

from taskomatic.model import OrderingKey
from taskomatic.partitions import DEFAULT_PARTITIONS, partition_of

__all__ = ["ROUTINGS", "HashRouting", "PinnedRouting", "Routing", "make_routing", "shard_for"]


def shard_for(key: OrderingKey, shards: int) -> int:
    """The shard slot in [0, shards) that runs every task of ``key``."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    return zlib.crc32(str(key).encode("utf-8")) % shards


class PinnedRouting:
    """``--routing pinned``: a free key goes to whichever slot has room first, and stays
    there only while it has tasks in flight (the dispatcher's own bookkeeping)."""

    name = "pinned"

    def home(self, key: OrderingKey) -> int | None:
        return None


class HashRouting:
    """``--routing hash``: partition p always runs on slot p mod N, whatever its load.

    Per-key order needs no coordination: a key never changes slot (except a
    task an interrupted shard committed running, which goes back to the slot
    that marked it, as with pinned routing).
    """

    name = "hash"

    def __init__(self, shards: int, partitions: int) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self.shards = shards
        self.partitions = partitions

    def home(self, key: OrderingKey) -> int:
        return partition_of(key, self.partitions) % self.shards


Routing = PinnedRouting | HashRouting
ROUTINGS = ("hash", "pinned")


def make_routing(name: str, shards: int, partitions: int = DEFAULT_PARTITIONS) -> Routing:
    """The routing a ``routing`` setting names; ``partitions``: P as the database records it."""
    if name == "hash":
        return HashRouting(shards, partitions)
    if name == "pinned":
        return PinnedRouting()
    raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {name!r}")
