"""Messages between the fetcher, the shards and the supervisor.

Frozen dataclasses, pickled over each shard's own socket (one channel per
shard, so a shard killed mid-message can only break its own channel), sent
through ``channel.send``/``channel.recv``. Tasks travel in batches: one
message carries every task sent to a shard in one go, and every outcome a
shard committed in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from taskomatic.model import TaskRow


# fetcher -> shard
@dataclass(frozen=True)
class Run:
    """Run these, after what was sent before, in this order."""

    tasks: tuple[TaskRow, ...]


@dataclass(frozen=True)
class Drain:
    """Finish the current task, hand back the rest, exit."""


# shard -> fetcher
@dataclass(frozen=True)
class Hello:
    """A shard connected for a slot. It holds nothing unstarted: it drops that when it loses the fetcher."""

    slot: int
    pid: int


@dataclass(frozen=True)
class Started:
    """The shard is starting these (a batch of different keys, or one task)."""

    task_ids: tuple[int, ...]


@dataclass(frozen=True)
class TaskEnd:
    task_id: int
    state: str  # finished / failed / skipped (not ours to run after all)
    # How long the action ran (None: it did not run); the fetcher's estimate of
    # how much work a shard has in hand comes from these.
    seconds: float | None = None
    action: str = ""


@dataclass(frozen=True)
class Ended:
    """These tasks' outcomes are committed (or they were not ours): the fetcher forgets them."""

    ends: tuple[TaskEnd, ...]


@dataclass(frozen=True)
class Performed:
    """These ran; their outcomes are held for the next commit. The slot may take more work now."""

    task_ids: tuple[int, ...]


@dataclass(frozen=True)
class Deferred:
    """Parked behind a retry or a wait: still held, but not counted in the send window."""

    task_ids: tuple[int, ...]


@dataclass(frozen=True)
class Several:
    """Messages written together (what one commit ended and what it started): one wake of the fetcher."""

    messages: tuple[object, ...]


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
