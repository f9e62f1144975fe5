"""A shard's outcomes: held until the next commit, fenced, written once.

A task's outcome is not committed on its own: it is *held* and written in
the transaction that starts the shard's next tasks (or alone when the shard
falls idle), so a stream of quick tasks costs one commit per batch. The
fetcher hears a task ended only once its outcome is committed, so it never
forgets a task whose end could still be lost.

Every write is *fenced* in multihost mode: it goes through only for tasks
whose partition lease (fencing token) is still ours, with our lease live, so
an instance that lost a partition never writes over the new owner's outcome.
Starts and ends carry their fence in the statement itself
(``mark_running_fenced``, ``record_outcomes_fenced``); any other write first
locks the leases it depends on (``hold_partitions``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import psycopg2
import psycopg2.errors

from taskomatic import metrics
from taskomatic.actions.base import Outcome, RowUpdate
from taskomatic.config import Config
from taskomatic.db import partitions as dbp
from taskomatic.db import task_writes
from taskomatic.db.store import Store
from taskomatic.logsetup import task_fields
from taskomatic.model import EndState, OutcomeState, TaskRow
from taskomatic.runtime import clock
from taskomatic.runtime.lease import limit_idle_transaction
from taskomatic.runtime.messages import TaskEnd
from taskomatic.runtime.parking import ParkingLot
from taskomatic.text import first_line

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_ATTEMPTS = 3
CONFLICTS = (psycopg2.errors.DeadlockDetected, psycopg2.errors.SerializationFailure)
CONNECTION_LOST = (psycopg2.OperationalError, psycopg2.InterfaceError)


def now() -> datetime:
    """When something happens to a task (runtime/clock.py: immune to wall-clock steps)."""
    return clock.now()


def named(task: TaskRow) -> str:
    """How log lines name a task: "task 12 (start_vm Vm:3)"; row text shortened (it is input)."""
    return f"task {task.id} ({_short(task.action)} {_short(task.target_type)}:{task.target_id})"


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


@dataclass
class PendingOutcome:
    """An outcome held for the next commit."""

    task: TaskRow
    outcome: Outcome
    time_started: datetime | None  # None: keep the time_started marked when it began
    time_ended: datetime
    # Set when the real outcome's row changes were refused and this is the fallback.
    unrecordable: bool = False

    def end(self) -> TaskEnd:
        seconds = None if self.time_started is None else (self.time_ended - self.time_started).total_seconds()
        return TaskEnd(self.task.id, self.outcome.state, seconds, self.task.action)


class WorkRefused(Exception):
    """The database refused a transaction's work. ``deferred``: the held outcomes were written with
    the work's statements, so the refusal may be theirs; otherwise they were written fine first."""

    def __init__(self, error: psycopg2.DatabaseError, deferred: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.deferred = deferred


class Outcomes:
    """The outcomes a shard holds, and every transaction that writes task ends.

    ``tell_ended`` passes committed ends on to the fetcher; ``action_label``
    turns an action name into a metric label.
    """

    def __init__(self, store: Store, config: Config, instance_id: int, multihost: bool,
                 parking: ParkingLot, tell_ended: Callable[[tuple[TaskEnd, ...]], None],
                 action_label: Callable[[TaskRow], str]) -> None:
        self.store = store
        self.config = config
        self.instance_id = instance_id
        self.multihost = multihost
        self.parking = parking
        self.tell_ended = tell_ended
        self.action_label = action_label
        # Outcomes taken, not yet committed: written with the next start (at most one per key).
        self.pending: list[PendingOutcome] = []
        # Held outcomes taken into the open transaction, not written yet: the next statement that
        # writes task ends or starts carries them (end_and_start), or they go last.
        self.deferred: list[PendingOutcome] = []

    def hold(self, pending: PendingOutcome) -> None:
        self.pending.append(pending)

    def held_ids(self) -> tuple[int, ...]:
        return tuple(p.task.id for p in self.pending)

    def send_ended(self, *ends: TaskEnd) -> None:
        self.tell_ended(ends)

    # -- fencing ------------------------------------------------------------------
    def fenced(self, tasks: list[TaskRow]) -> list[TaskRow]:
        """Multihost: those of ``tasks`` whose partition lease is still ours (and our lease live), locked.

        The others are logged and counted as refused writes. Standalone: all of them.
        """
        if not self.multihost or not tasks:
            return tasks
        leases = leases_of(tasks)
        held = dbp.hold_partitions(self.store, self.instance_id, leases, starting=False) if leases else set()
        allowed = []
        for task in tasks:
            if task.partition in held and leases.get(task.partition) == task.token:
                allowed.append(task)
            else:
                self.refused(task)
        return allowed

    def refused(self, task: TaskRow) -> None:
        metrics.write_fenced()
        log.warning("%s: write refused: the lease of partition %s (token %s) or our lease is no longer ours",
                    named(task), task.partition, task.token, extra=task_fields(task))

    def fenced_out(self, task: TaskRow) -> bool:
        return not self.fenced([task])

    # -- commits ------------------------------------------------------------------
    def commit_with_pending(self, work: Callable[[], T], defer: bool = True) -> T:
        """Run ``work`` in one transaction that also writes the held outcomes.

        Held outcomes without row changes are written with the work's first
        statement that writes task ends or starts (one round trip for both), or
        after the work (``defer``; otherwise, and with row changes, before it:
        what the work reads must see those changes).

        A lock conflict (deadlock, serialization failure) is retried; if the
        database refuses a held outcome's row changes, that outcome is recorded
        as failed with the reason instead, so one bad write cannot wedge the
        shard. A lost connection is not handled here: the shard exits, and its
        replacement reconciles.
        """
        attempt = 1
        while True:
            try:
                return self._commit_once(work, defer)
            except CONFLICTS as exc:
                self.store.rollback()
                log.warning("database conflict (%s), retrying (%d/%d)", type(exc).__name__, attempt, DB_ATTEMPTS)
                if attempt == DB_ATTEMPTS:
                    raise
                attempt += 1
            except WorkRefused as refused:
                self.store.rollback()
                self.flush(defer=False)
                if refused.deferred:
                    continue  # the outcomes went with the work: now written alone, the work runs again
                raise refused.error from None  # not the held outcomes' fault: report the refusal
            except psycopg2.DatabaseError as exc:
                if isinstance(exc, CONNECTION_LOST) or not self.pending:
                    raise
                self.store.rollback()
                if len(self.pending) > 1:
                    self._flush_each()  # find the outcome the database refuses
                    continue
                held = self.pending[0]
                if held.unrecordable:
                    raise
                log.error("task %s: the database refused its result: %s", held.task.id, first_line(exc),
                          extra=task_fields(held.task))
                self.pending = [PendingOutcome(held.task, Outcome.failed(
                    f"{held.task.action} ran ({held.outcome.state}), but the database refused its result: "
                    f"{first_line(exc)}"), held.time_started, held.time_ended, unrecordable=True)]

    def flush(self, defer: bool = True) -> None:
        """Commit the held outcomes now (falling idle, or before something must see them)."""
        if self.pending:
            self.commit_with_pending(lambda: None, defer)

    def _flush_each(self) -> None:
        """Write the held outcomes one transaction each (after a batch of them was refused)."""
        outcomes, self.pending = self.pending, []
        for outcome in outcomes:
            self.pending = [outcome]
            self.commit_with_pending(lambda: None, defer=False)

    def _commit_once(self, work: Callable[[], T], defer: bool) -> T:
        flushed: list[PendingOutcome] = []
        deferred = False
        try:
            with self.store.transaction():
                limit_idle_transaction(self.store, self.config)
                if self.pending:
                    flushed, self.pending = self.pending, []
                    # Only their task rows change, which no prepare reads (actions/base.py): they may
                    # wait for the work's first write of ends or starts, and go in its statement.
                    deferred = defer and not any(p.outcome.row_updates for p in flushed)
                    if deferred:
                        self.deferred = list(flushed)
                    else:
                        self.write(flushed)
                try:
                    result = work()
                    if self.deferred:  # the work wrote no ends or starts: they end the transaction
                        self._write(self._take_deferred(), last=True)
                except psycopg2.DatabaseError as exc:
                    if flushed and not isinstance(exc, CONNECTION_LOST + CONFLICTS):
                        # Taken by a statement of the work (none left deferred): the refusal may be theirs.
                        raise WorkRefused(exc, deferred and not self.deferred) from exc
                    raise
        except BaseException:
            self.deferred = []
            self.pending = flushed + self.pending  # rolled back: hold them again
            raise
        if flushed:
            self.send_ended(*(p.end() for p in flushed))
        return result

    def _take_deferred(self) -> list[PendingOutcome]:
        taken, self.deferred = self.deferred, []
        return taken

    # -- writes ---------------------------------------------------------------------
    def mark_running(self, tasks: list[TaskRow], moment: datetime, slot: int, last: bool = False
                     ) -> dict[int, datetime]:
        """Mark these queued tasks running (multihost: fenced), with the deferred outcomes in the same
        statement; id -> created_at of each marked. ``last``: nothing follows in the transaction."""
        ended = self._take_deferred()
        ids = [t.id for t in tasks]
        if not self.multihost:
            if not ended:
                return task_writes.mark_running(self.store, self.instance_id, ids, moment, slot, last)
            written, started = task_writes.end_and_start(self.store, self.instance_id, _ends(ended), ids, moment,
                                                         slot, last)
            self._written(ended, written)
            return started
        leases = leases_of(tasks + [p.task for p in ended])
        current = [t.id for t in tasks if t.partition is not None and leases.get(t.partition) == t.token]
        if not ended:
            return dbp.start_tasks_fenced(self.store, self.instance_id, leases, current, slot, moment, last)
        written, started = dbp.end_and_start_fenced(self.store, self.instance_id, leases,
                                                    _ends(_current(ended, leases)), current, slot, moment, last)
        self._written(ended, written)
        return started

    def _record(self, todo: list[PendingOutcome], last: bool) -> set[int]:
        if not self.multihost:
            ends = _ends(todo)
            return task_writes.record_outcomes(self.store, self.instance_id, ends.task_ids, ends.states,
                                               ends.messages, ends.starts, ends.ends, last)
        leases = leases_of([p.task for p in todo])
        return set(dbp.record_outcomes_fenced(self.store, self.instance_id, leases, [
            dbp.Outcome(p.task.id, p.outcome.state, p.outcome.message, p.time_started, p.time_ended)
            for p in _current(todo, leases)], last))

    def write(self, outcomes: list[PendingOutcome]) -> set[int]:
        """Write outcomes and their row changes, those we may (in the caller's transaction); the ids written.
        The deferred outcomes go with them."""
        return self._write(self._take_deferred() + outcomes)

    def _write(self, todo: list[PendingOutcome], last: bool = False) -> set[int]:
        if not todo:
            return set()
        written = self._record(todo, last)
        self._written(todo, written)
        return written

    def _written(self, todo: list[PendingOutcome], written: set[int]) -> None:
        """After writing ``todo``: log those refused, write the row changes of those written."""
        for pending in todo:
            if pending.task.id not in written:
                # Fencing: someone else owns the task now; our rows must not overwrite theirs.
                log.warning("task %s: outcome %s not recorded, the task is no longer ours",
                            pending.task.id, pending.outcome.state, extra=task_fields(pending.task))
                if self.multihost:
                    metrics.write_fenced()
                continue
            for update in pending.outcome.row_updates:
                self.store.update_row(update.table, update.row_id, update.values)

    def fail_unstartable(self, task: TaskRow, message: str, updates: list[RowUpdate], moment: datetime) -> bool:
        """In the caller's transaction: a task we hold fails before it starts. Was it recorded?"""
        recorded = task_writes.fail_unstartable(self.store, self.instance_id, task.id, message, moment)
        if recorded:
            for update in updates:
                self.store.update_row(update.table, update.row_id, update.values)
        return recorded

    def settle(self, task: TaskRow, outcome: Outcome) -> bool:
        """Write an outcome decided without performing anything now (reconciliation, children, retries)."""
        moment = now()
        written = self.commit_with_pending(lambda: task.id in self.write([PendingOutcome(task, outcome, None, moment)]))
        if written:
            self.log_outcome(task, outcome)
            self.send_ended(TaskEnd(task.id, outcome.state))
        return written

    def fail_before_start(self, task: TaskRow, message: str, updates: list[RowUpdate]) -> None:
        """The task fails without having started (bad row, refused start, too many retries)."""
        moment = now()

        def work() -> bool:
            if self.fenced_out(task):
                return False
            self.fail_unstartable(task, message, updates, moment)
            return True

        recorded = self.commit_with_pending(work)
        self.parking.ended(task.id)
        if recorded:  # a fenced-out write was logged as refused; the task is not ours to fail
            self.log_failed_start(task, message)
        self.send_ended(TaskEnd(task.id, EndState.FAILED if recorded else EndState.SKIPPED))

    def log_failed_start(self, task: TaskRow, message: str) -> None:
        metrics.task_ended(self.action_label(task), OutcomeState.FAILED, None)
        log.warning("%s failed: %s", named(task), message, extra=task_fields(task))

    def log_outcome(self, task: TaskRow, outcome: Outcome, seconds: float | None = None) -> None:
        self.parking.ended(task.id)
        metrics.task_ended(self.action_label(task), outcome.state, seconds)
        # A routine success is a debug line: at thousands of tasks a second, info lines would
        # flood the journal (journald drops a unit's lines beyond 10,000 per 30 s by default);
        # the tasks table and `taskomatic tasks --follow` are the record of every task.
        level = logging.DEBUG if outcome.state == OutcomeState.FINISHED else logging.WARNING
        if log.isEnabledFor(level):  # spares building the journal fields for a routine success
            log.log(level, "%s %s%s", named(task), outcome.state, f": {outcome.message}" if outcome.message else "",
                    extra=task_fields(task))


def _ends(todo: list[PendingOutcome]) -> task_writes.Ends:
    return task_writes.Ends(task_ids=[p.task.id for p in todo], states=[p.outcome.state for p in todo],
                            messages=[p.outcome.message for p in todo], starts=[p.time_started for p in todo],
                            ends=[p.time_ended for p in todo])


def _current(todo: list[PendingOutcome], leases: dict[int, int]) -> list[PendingOutcome]:
    """Those of ``todo`` claimed under the newest token ``leases`` has for their partition."""
    return [p for p in todo if p.task.partition is not None and leases.get(p.task.partition) == p.task.token]


def leases_of(tasks: list[TaskRow]) -> dict[int, int]:
    """partition -> token the tasks were claimed under (multihost). Two tokens for one partition: the
    newer is the lease that can still be current, a task under the older one is refused."""
    leases: dict[int, int] = {}
    for task in tasks:
        if task.partition is not None and task.token is not None:
            leases[task.partition] = max(task.token, leases.get(task.partition, task.token))
    return leases
