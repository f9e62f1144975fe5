"""Retention: ended tasks leave the tasks table after [retention] keep_finished.

The tasks table is where UIs read a task's outcome, and the table the daemon
works in: every finished row it keeps costs the next task a little (its
statistics, its indexes' size, vacuum's work). So an ended task (finished,
failed, canceled) stays there ``keep_finished`` after its end, then moves to
``tasks_archive`` (same columns; ``taskomatic tasks --archive``, ``taskomatic
show``) or, with ``archive = no``, is deleted; archived tasks are deleted
``archive_keep`` after their end. A task that queued others (clear_vms) goes
only once they have all left tasks; a task that has not ended is never touched.

Who runs it: the reconciler process of every instance, every
``retention_interval`` seconds, in batches of ``retention_batch`` rows, each
batch its own transaction under a transaction-level advisory lock, so only
one instance (or ``taskomatic db prune``) works at a time; a pass stops after
``PASS_SECONDS`` and goes on at the next interval. Queries:
``taskomatic/db/retention.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2

from taskomatic.config import Config
from taskomatic.db import retention as retention_db
from taskomatic.db.store import Store
from taskomatic.settings import duration_seconds
from taskomatic.text import first_line

log = logging.getLogger(__name__)

PASS_SECONDS = 10.0  # a daemon's pass yields after this long; the rest waits for the next interval


@dataclass(frozen=True)
class Policy:
    """What to do with ended tasks; ages in seconds, None meaning forever."""

    keep_s: float | None
    archive: bool
    archive_keep_s: float | None
    batch: int

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(keep_s=duration_seconds(config.keep_finished), archive=config.archive,
                   archive_keep_s=duration_seconds(config.archive_keep), batch=config.retention_batch)

    @property
    def does_anything(self) -> bool:
        return self.keep_s is not None or self.archive_keep_s is not None

    def describe(self) -> str:
        def age(seconds: float | None) -> str:
            return "forever" if seconds is None else f"{seconds:g} s"

        where = (f"archived (kept there {age(self.archive_keep_s)})" if self.archive else "deleted")
        return f"ended tasks stay in tasks {age(self.keep_s)}, then are {where}"


@dataclass
class PassResult:
    moved: int = 0  # rows that left tasks (archived, or deleted with archive = no)
    archive_pruned: int = 0  # rows deleted from tasks_archive
    locked_out: bool = False  # another instance (or command) was running retention
    finished: bool = True  # False: stopped early (time budget or stop) with more to do


def run_pass(store: Store, policy: Policy, deadline: float | None = None,
             stopping: Callable[[], bool] = lambda: False, wait: bool = False) -> PassResult:
    """Move, delete and prune in batches until nothing is left, ``deadline`` (monotonic) or ``stopping()``.

    ``wait``: wait for another instance's batch to end instead of giving the pass up (the command line).
    """
    result = PassResult()
    steps: list[tuple[str, Callable[[Store, float, int], int], float]] = []
    if policy.keep_s is not None:
        steps.append(("moved", retention_db.archive_ended if policy.archive else retention_db.prune_ended,
                      policy.keep_s))
    if policy.archive_keep_s is not None:
        steps.append(("archive_pruned", retention_db.prune_archive, policy.archive_keep_s))
    for field, step, keep_s in steps:
        while True:
            if stopping() or (deadline is not None and time.monotonic() >= deadline):
                result.finished = False
                return result
            with store.transaction():
                if wait:
                    retention_db.wait_lock(store)
                elif not retention_db.try_lock(store):
                    result.locked_out = True
                    return result
                done = step(store, keep_s, policy.batch)
            setattr(result, field, getattr(result, field) + done)
            if done == 0:  # not "< batch": a parent becomes eligible once its children have gone
                break
    return result


def dry_run(store: Store, policy: Policy) -> dict[str, Any]:
    """What a pass would do now, counted (nothing changes)."""
    try:
        out: dict[str, Any] = {"policy": policy.describe()}
        if policy.keep_s is not None:
            ended = retention_db.count_ended(store, policy.keep_s)
            out["would_" + ("archive" if policy.archive else "delete")] = int(ended["eligible"])
            out["oldest_end"] = ended["oldest_end"]
            out["held_back_by_children"] = retention_db.count_held_back_parents(store, policy.keep_s)
        if policy.archive_keep_s is not None:
            expired = retention_db.count_archive_expired(store, policy.archive_keep_s)
            out["would_delete_from_archive"] = int(expired["eligible"])
        return out
    finally:
        store.rollback()


class RetentionJob:
    """The daemon's periodic pass (run from the reconciler's loop)."""

    def __init__(self, config: Config) -> None:
        self.policy = Policy.from_config(config)
        self.interval = config.retention_interval
        self.next_run = time.monotonic()  # a first pass right after start

    def due(self) -> bool:
        return self.policy.does_anything and time.monotonic() >= self.next_run

    def run_if_due(self, store: Store, stopping: Callable[[], bool]) -> PassResult | None:
        """One pass when due; a database error other than a lost connection is logged, not raised."""
        if not self.due():
            return None
        self.next_run = time.monotonic() + self.interval
        try:
            result = run_pass(store, self.policy, time.monotonic() + PASS_SECONDS, stopping)
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            raise  # the connection is gone: the caller's process is replaced
        except psycopg2.Error as exc:
            store.rollback()
            log.error("retention pass failed (the tasks stay where they are; next try in %g s): %s",
                      self.interval, first_line(exc))
            return None
        if result.locked_out:
            log.debug("retention: another instance is running it; next try in %g s", self.interval)
        if result.moved or result.archive_pruned:
            log.info("retention: %d ended tasks %s, %d deleted from the archive%s", result.moved,
                     "archived" if self.policy.archive else "deleted", result.archive_pruned,
                     "" if result.finished else " (more at the next pass)")
        return result
