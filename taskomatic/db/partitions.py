"""Partition leases: the multihost ownership protocol, one typed function per query.

The queries are in ``sql/partitions.sql``; docs/partitions.md describes the
protocol. Every function runs in the caller's transaction (``Store`` does not
commit): acquiring and adopting belong in one transaction, and a fenced write
commits with whatever else the caller writes.

A held partition is a (partition, token) pair; the functions that act on held
partitions take them as a mapping partition -> token, and the database does
nothing for a pair that is no longer current.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from taskomatic.db import task_writes
from taskomatic.db.store import Row, Store


@dataclass(frozen=True)
class PartitionLease:
    """One row of partition_leases, as the balancer sees it."""

    partition: int
    instance_id: int | None  # None: free
    token: int
    releasing: bool
    wanted_by: int | None
    holder_live: bool


@dataclass(frozen=True)
class Acquired:
    partition: int
    token: int
    previous: int | None  # the holder whose lease ran out, or None if it was free


@dataclass(frozen=True)
class Released:
    partitions: tuple[int, ...]
    unclaimed: int  # claimed tasks that had not started, handed back to the queue


@dataclass(frozen=True)
class Reservations:
    made: tuple[int, ...]  # newly reserved for us
    dropped: tuple[int, ...]  # ours before, no longer wanted


@dataclass(frozen=True)
class Outcome:
    task_id: int
    state: str
    message: str | None
    time_started: datetime | None  # None: keep the one marked
    time_ended: datetime


def _pairs(held: Mapping[int, int]) -> dict[str, list[int]]:
    ordered = sorted(held.items())
    return {"partitions": [p for p, _ in ordered], "tokens": [t for _, t in ordered]}


def partition_count(store: Store) -> int:
    """P, from the database (every instance must use the same)."""
    return int(store.scalar("partition_count"))


def partition_view(store: Store) -> list[PartitionLease]:
    return [PartitionLease(r["partition"], r["instance_id"], r["token"], r["releasing"], r["wanted_by"],
                           r["holder_live"]) for r in store.all("partition_view")]


def live_multihost_instances(store: Store) -> list[int]:
    return [r["id"] for r in store.all("live_multihost_instances")]


PARTITIONS_CHANNEL = "taskomatic_partitions"  # announce_partition_moves notifies on it


def announce_partition_moves(store: Store, instance_id: int) -> None:
    """In the transaction that reserved or freed partitions: the others' fetchers balance again at its commit."""
    store.one("announce_partition_moves", instance_id=instance_id)


def held_partitions(store: Store, instance_id: int) -> dict[int, int]:
    """partition -> token of every partition the instance holds (releasing ones too)."""
    return {r["partition"]: r["token"] for r in store.all("held_partitions", instance_id=instance_id)}


def releasing_partitions(store: Store, instance_id: int) -> set[int]:
    """Those of the instance's partitions it is handing over (a restarted fetcher goes on with that)."""
    return {r["partition"] for r in store.all("held_partitions", instance_id=instance_id) if r["releasing"]}


def acquire_partitions(store: Store, instance_id: int, partitions: Iterable[int]) -> list[Acquired]:
    """Take those of ``partitions`` that are free or whose holder's lease ran out; new tokens.

    Call ``adopt_partition_tasks`` for them in the same transaction.
    """
    rows = store.all("acquire_partitions", instance_id=instance_id, partitions=sorted(set(partitions)))
    return sorted((Acquired(r["partition"], r["token"], r["previous"]) for r in rows), key=lambda a: a.partition)


def adopt_partition_tasks(store: Store, instance_id: int, partitions: Iterable[int]) -> list[Row]:
    """Unfinished tasks of just-acquired partitions that earlier holders had claimed become ours, in id order."""
    wanted = sorted(set(partitions))
    if not wanted:
        return []
    rows = store.all("adopt_partition_tasks", instance_id=instance_id, partitions=wanted)
    return sorted(rows, key=lambda r: r["id"])


def request_partitions(store: Store, instance_id: int, partitions: Iterable[int]) -> Reservations:
    """Reserve exactly ``partitions`` (live holders must hand them over to us); drop our other reservations.

    Call it every balancing round, with an empty list too: a reservation the
    balance no longer wants would keep the partition from its new taker.
    """
    rows = store.all("request_partitions", instance_id=instance_id, partitions=sorted(set(partitions)))
    return Reservations(tuple(sorted(r["partition"] for r in rows if r["wanted_by"] is not None)),
                        tuple(sorted(r["partition"] for r in rows if r["wanted_by"] is None)))


def begin_release(store: Store, instance_id: int, held: Mapping[int, int]) -> Released:
    """Hand-over step 1: stop starting these partitions' tasks; their unstarted claimed tasks go back."""
    rows = store.all("begin_release", instance_id=instance_id, **_pairs(held))
    return Released(tuple(r["partition"] for r in rows), int(rows[0]["unclaimed"]) if rows else 0)


def release_partitions(store: Store, instance_id: int, held: Mapping[int, int]) -> Released:
    """Hand-over, last step: free those of ``held`` with no task running under us."""
    rows = store.all("release_partitions", instance_id=instance_id, **_pairs(held))
    return Released(tuple(r["partition"] for r in rows), int(rows[0]["unclaimed"]) if rows else 0)


def release_idle_partitions(store: Store, instance_id: int) -> list[int]:
    """Graceful leave: free every partition of ours with nothing running under us."""
    return sorted(r["partition"] for r in store.all("release_idle_partitions", instance_id=instance_id))


def claim_partition_tasks(store: Store, instance_id: int, held: Mapping[int, int],
                          per_partition: int | Mapping[int, int], limit: int, last: bool = False) -> list[Row]:
    """Claim the ``limit`` oldest queued tasks (by id) of held partitions, at most ``per_partition`` of each
    (one cap for all, or a cap per held partition). ``last``: nothing follows it in the transaction
    (``Store.all_last``).

    Each row carries its ``partition``; nothing for a partition whose token
    is not current, that is releasing, or once our lease ran out.
    """
    if not held or limit < 1:
        return []
    pairs = _pairs(held)
    caps = [max(1, per_partition if isinstance(per_partition, int) else per_partition.get(p, 1))
            for p in pairs["partitions"]]
    store.send_with_next("claim_partition_planner")  # the plan must not depend on the statistics (the SQL says why)
    rows = store.all_last("claim_partition_tasks", last, instance_id=instance_id, caps=caps, limit=limit, **pairs)
    return sorted(rows, key=lambda r: r["id"])


def claim_partition_window(store: Store, instance_id: int, held: Mapping[int, int], window: int, limit: int,
                           last: bool = False) -> tuple[list[Row], int]:
    """Claim the ``limit`` oldest queued tasks (by id) of held partitions among the ``window`` oldest unclaimed
    queued tasks of all. (rows in id order, how many unclaimed queued tasks the window held.)

    Each row carries its ``partition``; nothing for a partition whose token is not current, that is
    releasing, or once our lease ran out.
    """
    if not held or limit < 1:
        return [], 0
    store.send_with_next("claim_partition_planner")  # the plan must not depend on the statistics (the SQL says why)
    rows = store.all_last("claim_partition_window", last, instance_id=instance_id, window=window,
                          limit=limit, **_pairs(held))
    scanned = int(rows[0]["scanned"])  # always one row at least: a NULL id when nothing was claimed
    return sorted((r for r in rows if r["id"] is not None), key=lambda r: r["id"]), scanned


def hold_partitions(store: Store, instance_id: int, held: Mapping[int, int], starting: bool) -> set[int]:
    """Fencing for any other write: the partitions still ours under these tokens, locked to the end of the
    transaction (``starting``: releasing ones do not count)."""
    if not held:
        return set()
    rows = store.all("hold_partitions", instance_id=instance_id, starting=starting, **_pairs(held))
    return {r["partition"] for r in rows}


def mark_running_fenced(store: Store, instance_id: int, held: Mapping[int, int], task_ids: Sequence[int],
                        shard: int, time_started: datetime) -> list[int]:
    """Start these tasks, only those of partitions still ours (not releasing); returns the ids started."""
    if not task_ids:
        return []
    rows = store.all("mark_running_fenced", instance_id=instance_id, task_ids=list(task_ids), shard=shard,
                     time_started=time_started, **_pairs(held))
    return sorted(r["id"] for r in rows)


def end_and_start_fenced(store: Store, instance_id: int, held: Mapping[int, int], ends: task_writes.Ends,
                         task_ids: Sequence[int], shard: int, time_started: datetime, last: bool
                         ) -> tuple[set[int], dict[int, datetime]]:
    """``record_outcomes_fenced`` and ``mark_running_fenced`` in one statement: the ids written, and id ->
    created_at of each started. ``last``: nothing follows it in the transaction (``Store.all_last``)."""
    rows = store.all_last("end_and_start_fenced", last, instance_id=instance_id, start_ids=list(task_ids),
                          shard=shard, time_started=time_started, **ends.params(), **_pairs(held))
    return task_writes.split_ends_and_starts(rows)


def start_tasks_fenced(store: Store, instance_id: int, held: Mapping[int, int], task_ids: Sequence[int],
                       shard: int, time_started: datetime, last: bool = False) -> dict[int, datetime]:
    """``mark_running_fenced`` for a shard: id -> when it was submitted (created_at), for each task started.
    ``last``: nothing follows it in the transaction (``Store.all_last``)."""
    if not task_ids:
        return {}
    rows = store.all_last("mark_running_fenced", last, instance_id=instance_id, task_ids=list(task_ids),
                          shard=shard, time_started=time_started, **_pairs(held))
    return {r["id"]: r["created_at"] for r in rows}


def record_outcomes_fenced(store: Store, instance_id: int, held: Mapping[int, int],
                           outcomes: Sequence[Outcome], last: bool = False) -> list[int]:
    """Write these ends, only for tasks of partitions still ours; returns the ids written.
    ``last``: nothing follows it in the transaction (``Store.all_last``)."""
    if not outcomes:
        return []
    rows = store.all_last("record_outcomes_fenced", last, instance_id=instance_id,
                          task_ids=[o.task_id for o in outcomes], states=[o.state for o in outcomes],
                          messages=[o.message for o in outcomes], starts=[o.time_started for o in outcomes],
                          ends=[o.time_ended for o in outcomes], **_pairs(held))
    return sorted(r["id"] for r in rows)
