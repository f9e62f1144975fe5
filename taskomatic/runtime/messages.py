"""Messages between the fetcher, the shards and the supervisor.

Frozen dataclasses, pickled over each shard's own socket (one channel per
shard, so a shard killed mid-message can only break its own channel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskRow:
    """A claimed task as the fetcher read it; the shard re-checks it when it starts."""

    id: int
    target_type: str
    target_id: int | None
    action: str
    args: Any
    key_type: str | None
    key_id: int | None
    # 'queued': run it. 'running': it was interrupted, reconcile first.
    state: str
    # Multihost: the fencing token of the key claim it was claimed under; every
    # write for it checks the claim still holds that token. None in standalone.
    token: int | None = None


# fetcher -> shard
@dataclass(frozen=True)
class Run:
    task: TaskRow


@dataclass(frozen=True)
class Drain:
    """Finish the current task, hand back the rest, exit."""


# shard -> fetcher
@dataclass(frozen=True)
class Hello:
    slot: int
    pid: int
    # Tasks the shard still holds (current first) after a fetcher restart.
    held: tuple[int, ...]


@dataclass(frozen=True)
class Started:
    task_id: int


@dataclass(frozen=True)
class Ended:
    task_id: int
    state: str


@dataclass(frozen=True)
class Deferred:
    """Parked behind a retry or a wait: still held, but not counted in the send window."""

    task_ids: tuple[int, ...]


@dataclass(frozen=True)
class Drained:
    returned: tuple[int, ...]


# fetcher -> supervisor
@dataclass(frozen=True)
class FetcherStatus:
    all_shards_up: bool
    queued_local: int
    running: int
    done_total: int
    shards_connected: int
