"""Route a task to a shard by a stable hash of its ordering key.

Python's ``hash()`` is salted per process, so it would send one key to
different shards in different processes; a CRC of the key's text is the same
everywhere and cheap.
"""

from __future__ import annotations

import zlib

from taskomatic.model import OrderingKey


def shard_for(key: OrderingKey, shards: int) -> int:
    """The shard slot in [0, shards) that runs every task of ``key``."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    return zlib.crc32(str(key).encode("utf-8")) % shards
