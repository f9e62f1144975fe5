"""A shard's execution of its tasks: batches, then prepare, begin and perform.

One path for every task: a single task is a batch of one.

1. ``take_batch`` takes the next task and, if it is quick, more quick tasks of
   other keys (from what each action took lately).
2. A task an earlier process left ``running`` is first *reconciled* (the
   action reads the real state): done, failed, waiting for its children, or
   not started (it runs again in its place).
3. In one transaction with the held outcomes (``outcomes.py``): each task is
   *prepared* (reads only; may fail or be already done), *fenced*, marked
   running, and *begun* (the transient state, the placement).
4. After the commit each started task is *performed* on libvirt, in order; its
   outcome is held for the next commit.

If the start of a batch is refused (a begin that fails, a database error),
its tasks start again one by one: a batch of one's refusal is that task's.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import psycopg2

from taskomatic import metrics
from taskomatic.actions.base import (
    Action,
    ActionContext,
    LeaseExpired,
    Outcome,
    Plan,
    RowUpdate,
    TaskFailed,
    TaskRetry,
)
from taskomatic.config import Config
from taskomatic.db import task_writes
from taskomatic.db.store import Store
from taskomatic.logsetup import task_fields
from taskomatic.model import TERMINAL_STATES, EndState, OutcomeState, Settlement, TaskRow, TaskState, key_of
from taskomatic.runtime.dispatch import LOOKAHEAD
from taskomatic.runtime.messages import Deferred, Performed, Started, TaskEnd
from taskomatic.runtime.outcomes import CONNECTION_LOST, Outcomes, PendingOutcome, named, now
from taskomatic.runtime.parking import ParkingLot
from taskomatic.text import first_line, quoted

log = logging.getLogger(__name__)

# Batches: tasks whose actions are expected to take this long together start
# in one transaction. An action not yet seen here counts as the whole budget,
# so it starts alone until it has shown it is quick.
BATCH_BUDGET = 0.002
BATCH_MAX = 64
BATCH_SCAN = 256  # queue entries looked at to fill a batch
ESTIMATE_WEIGHT = 0.2  # of the newest duration in an action's running estimate
WORK_SCAN = 16  # queue entries summed to tell whether a fetcher's lookahead of work is queued


class FetcherGone(Exception):
    """The fetcher died while a batch was being prepared: the batch must not start."""


@dataclass
class BatchStart:
    """What starting a batch did, acted on once its transaction committed."""

    run: list[tuple[TaskRow, Action, Plan]] = field(default_factory=list)  # marked running: perform these
    done: list[tuple[TaskRow, Outcome]] = field(default_factory=list)  # already done: outcome recorded
    failed: list[tuple[TaskRow, str]] = field(default_factory=list)  # could not start: recorded failed
    retry: list[tuple[TaskRow, str]] = field(default_factory=list)  # transient: park for a retry
    refused: list[TaskRow] = field(default_factory=list)  # marking refused: canceled, ended, or ours to settle
    ends: list[TaskEnd] = field(default_factory=list)  # for the fetcher


@dataclass
class ShardLink:
    """What execution needs of the shard around it: its fetcher channel and its lease."""

    send: Callable[[object], None]
    fetcher_gone: Callable[[], bool]
    lease_ok: Callable[[], bool]
    # Messages sent inside go to the fetcher in one write when it ends (one wake of the fetcher).
    together: Callable[[], AbstractContextManager[None]] = nullcontext


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


class Execution:
    def __init__(self, slot: int, instance_id: int, config: Config, store: Store, ctx: ActionContext,
                 actions: dict[str, Action], parking: ParkingLot, outcomes: Outcomes, link: ShardLink,
                 deadline: Any) -> None:
        self.slot = slot
        self.instance_id = instance_id
        self.config = config
        self.store = store
        self.ctx = ctx
        self.actions = actions
        self.parking = parking
        self.outcomes = outcomes
        self.link = link
        # multiprocess Value('d') on CLOCK_MONOTONIC (one clock for every process of the machine, and it never
        # steps): 0 when idle; the supervisor kills a shard past it
        self.deadline = deadline
        self.queue: deque[TaskRow] = deque()
        self.estimates: dict[str, float] = {}  # action -> running estimate of its duration (s)
        self.submitted: dict[int, datetime] = {}  # the batch being started: task id -> its created_at

    # -- batches -----------------------------------------------------------------
    def estimate(self, task: TaskRow) -> float:
        return self.estimates.get(task.action, BATCH_BUDGET)

    def learn(self, task: TaskRow, seconds: float) -> None:
        old = self.estimates.get(task.action)
        self.estimates[task.action] = seconds if old is None else old + ESTIMATE_WEIGHT * (seconds - old)

    def take_batch(self) -> list[TaskRow]:
        """Take the next task and, if it is quick, more quick ones of other keys to start with it.

        A key's first task in the queue may join; its later ones never jump
        ahead of it, and a task left behind (slow, parked, to be reconciled)
        holds its key's later tasks back too.
        """
        first = self.queue.popleft()
        budget = self.estimate(first)
        if first.state != TaskState.QUEUED or budget >= BATCH_BUDGET:
            return [first]
        batch = [first]
        seen = {key_of(first)}
        skipped: list[TaskRow] = []
        for _ in range(min(BATCH_SCAN, len(self.queue))):
            task = self.queue.popleft()
            key = key_of(task)
            quick = budget + self.estimate(task) < BATCH_BUDGET
            if key in seen or task.state != TaskState.QUEUED or self.parking.is_parked(task) or not quick:
                skipped.append(task)
                seen.add(key)
                if not quick or len(batch) >= BATCH_MAX:
                    break
                continue
            seen.add(key)
            batch.append(task)
            budget += self.estimate(task)
            if len(batch) >= BATCH_MAX:
                break
        self.queue.extendleft(reversed(skipped))
        return batch

    # -- the one path ------------------------------------------------------------
    def run(self, batch: list[TaskRow]) -> None:
        """Run a batch: settle an interrupted task, start the batch in one transaction, perform it in order."""
        reruns: set[int] = set()
        if batch[0].state == TaskState.RUNNING:  # take_batch never batches it with others
            if not self._guarded(batch[0], lambda: self._reconcile(batch[0])):
                return
            reruns.add(batch[0].id)
        # What the commit ended and what it started reach the fetcher in one message, not one each.
        with self.link.together():
            try:
                started = self.outcomes.commit_with_pending(lambda: self._start(batch, reruns))
            except FetcherGone:
                self.store.rollback()
                log.warning("lost the fetcher before starting %d tasks; they are sent again", len(batch))
                return
            except (TaskFailed, TaskRetry, psycopg2.DatabaseError) as exc:
                if isinstance(exc, CONNECTION_LOST):
                    raise
                self.store.rollback()
                refusal: Exception | None = exc
            else:
                refusal = None
                self._started(started)
        if refusal is not None:
            if len(batch) > 1:
                # One task's start was refused, and with it the batch's: start them one by one.
                self.outcomes.flush()
                for task in batch:
                    self.run([task])
            else:
                self._start_refused(batch[0], refusal)
            return
        for task in started.refused:
            self._not_started(task)
        if not started.run:
            return
        for position, (task, action, plan) in enumerate(started.run):
            if not self.link.lease_ok():
                # Committed 'running', not started: settled by reconciliation once the lease is back
                # (and if it is lost, by the key's next owner).
                log.warning("lease too old to start %d tasks; holding them", len(started.run) - position)
                self.queue.extendleft(reversed([replace(t, state=TaskState.RUNNING)
                                                for t, _, _ in started.run[position:]]))
                return
            self.deadline.value = time.monotonic() + self.config.task_timeout
            try:
                self._perform(task, action, plan)
            finally:
                self.deadline.value = 0.0
        self._say_performed()

    def _started(self, started: BatchStart) -> None:
        """After a batch's start committed: log and tell the fetcher what ended, park what waits for a retry."""
        for task, message in started.failed:
            self.parking.ended(task.id)
            self.outcomes.log_failed_start(task, message)
        for task, outcome in started.done:
            self.outcomes.log_outcome(task, outcome)
        if started.ends:
            self.outcomes.send_ended(*started.ends)
        for task, reason in started.retry:
            self.park_for_retry(task, reason)
        if started.run:
            self.link.send(Started(tuple(t.id for t, _, _ in started.run)))

    def _start_refused(self, task: TaskRow, exc: Exception) -> None:
        """A batch of one could not start (rolled back): the task fails, or waits for a retry."""
        if isinstance(exc, TaskFailed):
            self.outcomes.fail_before_start(task, exc.message, exc.row_updates)
        elif isinstance(exc, TaskRetry):  # rolled back: the task is still as it was
            self.park_for_retry(task, exc.message)
        else:
            log.error("task %s: the database refused a write: %s", task.id, first_line(exc), extra=task_fields(task))
            self.outcomes.fail_before_start(
                task, f"the database refused {task.action}'s changes: {first_line(exc)}", [])

    def _guarded(self, task: TaskRow, step: Callable[[], bool]) -> bool:
        """Run one task's step outside a batch; a database refusal fails the task (a lost connection propagates)."""
        self.deadline.value = time.monotonic() + self.config.task_timeout
        try:
            return step()
        except psycopg2.DatabaseError as exc:
            if isinstance(exc, CONNECTION_LOST):
                raise
            self.store.rollback()
            self._start_refused(task, exc)
            return False
        finally:
            self.deadline.value = 0.0

    def _reconcile(self, task: TaskRow) -> bool:
        """Settle a task an earlier process left running. True: it was not started, run it again."""
        if any(key_of(p.task) == key_of(task) for p in self.outcomes.pending):
            self.outcomes.flush()  # the real state must be read after its predecessor's effects are in the rows
        try:
            action = self.check(task)
            settled = action.reconcile(self.ctx, task)
            self.store.rollback()
        except TaskFailed as failure:
            self.store.rollback()
            self.outcomes.fail_before_start(task, failure.message, failure.row_updates)
            return False
        except TaskRetry as retry:
            self.store.rollback()
            self.park_for_retry(task, retry.message)
            return False
        except Exception as exc:  # a bug must cost one task, not the shard
            if isinstance(exc, CONNECTION_LOST):
                raise
            self.store.rollback()
            log.exception("task %s: unexpected error while preparing", task.id, extra=task_fields(task))
            self.outcomes.fail_before_start(task, f"internal error while preparing {task.action}: {exc!r}", [])
            return False
        log.info("%s reconciled: %s: %s", named(task), settled.kind, settled.message, extra=task_fields(task))
        metrics.task_reconciled(settled.kind)
        if settled.kind == Settlement.DONE:
            self.outcomes.settle(task, Outcome.finished(settled.message, *settled.row_updates))
            return False
        if settled.kind == Settlement.NEITHER:
            self.outcomes.settle(task, Outcome.failed(settled.message, *settled.row_updates))
            return False
        if settled.kind == Settlement.WAITING:
            self.parking.park_for_children(task, settled.message, time.monotonic())
            self.link.send(Deferred((task.id,)))
            return False
        return True

    def _start(self, batch: list[TaskRow], reruns: set[int]) -> BatchStart:
        """In the transaction that writes the held outcomes: prepare, then mark running and begin.

        Held outcomes that change resource rows are written before prepare, so
        a task sees its key's previous outcome in the rows without a commit of
        its own in between; the others go in the statement that marks the batch
        running (prepare reads no task rows). A task
        that cannot start fails here, in the same transaction; a transient
        failure is parked after the commit. A database error, or a begin that
        refuses, rolls the batch back (``run`` then starts its tasks one by one).
        """
        result = BatchStart()
        prepared: list[tuple[TaskRow, Action, Plan]] = []
        failing: list[tuple[TaskRow, str, list[RowUpdate]]] = []
        self.deadline.value = time.monotonic() + self.config.task_timeout
        try:
            for task in batch:
                try:
                    action = self.check(task)
                    prepared.append((task, action, action.prepare(self.ctx, task)))
                except TaskFailed as failure:
                    failing.append((task, failure.message, failure.row_updates))
                except TaskRetry as retry:
                    result.retry.append((task, retry.message))
                except psycopg2.DatabaseError:
                    raise
                except Exception as exc:  # a bug must cost one task, not the shard
                    log.exception("task %s: unexpected error while preparing", task.id, extra=task_fields(task))
                    failing.append((task, f"internal error while preparing {task.action}: {exc!r}", []))
        finally:
            self.deadline.value = 0.0
        # A task being settled is sent only to this slot: it need not wait for the fetcher.
        if not reruns and self.link.fetcher_gone():
            raise FetcherGone
        # Multihost: a first run's start is its own fence (mark_running_fenced); the rest lock their leases.
        fenced_by_start = {t.id for t, _, _ in prepared if t.id not in reruns} if self.outcomes.multihost else set()
        allowed = fenced_by_start | {t.id for t in self.outcomes.fenced(
            [t for t, _, _ in prepared if t.id not in fenced_by_start] + [t for t, _, _ in failing])}
        moment = now()
        # A rerun found already done does not start again: it is not marked, its outcome is written as
        # it stands (keeping its first time_started and attempts; the write is fenced all the same).
        settled = {t.id for t, _, plan in prepared if t.id in reruns and plan.already_done is not None}
        # Nothing to write after the marks: alone in its transaction, that statement is also the commit.
        last = not reruns and not failing and all(
            plan.already_done is None and plan.begin_hook is None and not plan.begin_updates for _, _, plan in prepared)
        marked = self._mark([t for t, _, _ in prepared if t.id in allowed and t.id not in settled], reruns, moment,
                            last)
        marked |= settled & allowed
        done: list[PendingOutcome] = []
        for task, action, plan in prepared:
            if task.id not in marked:
                if task.id in allowed:
                    result.refused.append(task)
                else:
                    result.ends.append(TaskEnd(task.id, EndState.SKIPPED))
            elif plan.already_done is not None:
                # A rerun keeps the time_started it was marked with when it first began.
                done.append(PendingOutcome(task, plan.already_done, None if task.id in reruns else moment, moment))
            else:
                plan.begin(self.store)
                result.run.append((task, action, plan))
        written = self.outcomes.write(done) if done else set()
        for pending in done:
            if pending.task.id in written:
                result.done.append((pending.task, pending.outcome))
            result.ends.append(TaskEnd(pending.task.id, pending.outcome.state if pending.task.id in written
                                       else EndState.SKIPPED))
        for task, message, updates in failing:
            recorded = task.id in allowed and self.outcomes.fail_unstartable(task, message, updates, moment)
            if recorded:
                result.failed.append((task, message))
            result.ends.append(TaskEnd(task.id, EndState.FAILED if recorded else EndState.SKIPPED))
        return result

    def _mark(self, tasks: list[TaskRow], reruns: set[int], moment: datetime, last: bool) -> set[int]:
        """Mark these tasks running (a rerun: again); the ids marked (canceled, ended or taken ones are not).
        ``last``: no write follows in the transaction."""
        first_runs = [t.id for t in tasks if t.id not in reruns]
        # When each was submitted: its enqueue-to-start latency is observed where its action starts.
        self.submitted = self.outcomes.mark_running([t for t in tasks if t.id not in reruns], moment,
                                                    self.slot, last) if first_runs else {}
        marked = set(self.submitted)
        for task in tasks:
            if task.id in reruns and task_writes.mark_rerun(self.store, self.instance_id, task.id, moment, self.slot):
                marked.add(task.id)
        return marked

    def _not_started(self, task: TaskRow) -> None:
        """Marking a task running was refused: settle it if an earlier shard of ours left it running."""
        if task.state == TaskState.QUEUED and self._interrupted(task):
            self.run([replace(task, state=TaskState.RUNNING)])
        else:
            log.info("task %s was canceled, has ended or is no longer ours; skipped", task.id,
                     extra=task_fields(task))
            self.outcomes.send_ended(TaskEnd(task.id, EndState.SKIPPED))

    def _interrupted(self, task: TaskRow) -> bool:
        """Is this 'queued' copy really a task this slot's earlier shard left running?

        A copy can be stale (sent again after a fetcher restart, while this
        slot's shard was finishing it); the task must then be reconciled, not
        skipped. Only the slot that marked it may: another may still run it.
        """
        rows = task_writes.task_states(self.store, [task.id])
        self.store.rollback()
        row = rows[0] if rows else None
        return bool(row and row["state"] == TaskState.RUNNING and row["claimed_by"] == self.instance_id
                    and row["run_by_shard"] == self.slot)

    def check(self, task: TaskRow) -> Action:
        """The action for a task, or TaskFailed saying what is wrong with the row."""
        action = self.actions.get(task.action)
        if action is None:
            known = ", ".join(sorted(self.actions))
            raise TaskFailed(f"unknown action {quoted(task.action)} (known actions: {known})")
        if task.target_type not in action.target_types:
            raise TaskFailed(
                f"action {task.action} acts on {' or '.join(action.target_types)}, "
                f"not on task_target_type {quoted(task.target_type)}")
        if not isinstance(task.args, dict):
            raise TaskFailed(f"args must be a JSON object, got {_json_type(task.args)}")
        action.validate_args(task.args)
        return action

    def _perform(self, task: TaskRow, action: Action, plan: Plan) -> None:
        """Perform a task committed running; its outcome is held for the next commit."""
        started = now()
        submitted = self.submitted.pop(task.id, None)
        if submitted is not None:  # a first run: the wait time_started - created_at says
            metrics.task_waited((started - submitted).total_seconds())
        try:
            outcome = action.perform(self.ctx, plan)
        except LeaseExpired:
            # Stopped between two steps: settled by reconciliation, like a crash there.
            self.store.rollback()
            log.warning("%s: lease too old to go on; left to reconciliation", named(task), extra=task_fields(task))
            self.queue.appendleft(replace(task, state=TaskState.RUNNING))
            return
        except TaskRetry as retry:
            self.store.rollback()
            self.park_for_retry(replace(task, state=TaskState.RUNNING), retry.message)
            return
        except Exception as exc:
            log.exception("task %s: unexpected error in %s", task.id, task.action, extra=task_fields(task))
            outcome = Outcome.failed(f"internal error in {task.action}: {exc!r}")
        ended = now()
        self.store.rollback()  # end any read transaction the action left open
        self.learn(task, (ended - started).total_seconds())
        if outcome.state == OutcomeState.WAITING:
            log.info("%s waiting: %s", named(task), outcome.message, extra=task_fields(task))
            self.parking.park_for_children(replace(task, state=TaskState.RUNNING), outcome.message or "",
                                           time.monotonic())
            self.link.send(Deferred((task.id,)))
            return
        self.outcomes.hold(PendingOutcome(task, outcome, started, ended))
        self.outcomes.log_outcome(task, outcome, (ended - started).total_seconds())

    def _say_performed(self) -> None:
        """Tell the fetcher which tasks ran, so it may send the next ones before their outcomes commit.

        Not when this shard, by its own estimates, has at least the fetcher's
        lookahead of work queued that it will start next: the slot would get
        no room from it (the fetcher sends a free key only below that), and
        the start of that work says Ended with its commit. Each message wakes
        the fetcher; a slow task whose successor is queued here sent two where
        one does. (The fetcher's ``Dispatcher`` is built with the same
        ``LOOKAHEAD``; were it ever configurable, both would have to follow.)
        """
        if self.outcomes.pending and not self._work_queued(LOOKAHEAD):
            self.link.send(Performed(self.outcomes.held_ids()))

    def _work_queued(self, at_least: float) -> bool:
        """Is at least this much work (by this shard's estimates) queued to start? Looks at a few tasks only.

        A parked key's task does not count: the shard only hands it back as
        Deferred, and with nothing else queued it would fall idle holding the
        outcome while the fetcher, not told, saw no room for the slot.
        """
        work = 0.0
        for position, task in enumerate(self.queue):
            if position >= WORK_SCAN:
                return False
            if self.parking.is_parked(task):
                continue
            work += self.estimate(task)
            if work >= at_least:
                return True
        return False

    # -- parked keys ------------------------------------------------------------
    def park_for_retry(self, task: TaskRow, reason: str) -> None:
        delay = self.parking.park_for_retry(task, reason, time.monotonic())
        if delay is None:
            count = self.parking.failures.pop(task.id, 0)
            message = f"gave up after {count} transient failures: {reason}"
            if task.state == TaskState.RUNNING:  # it had started: the real state is for the reconciler now
                self.outcomes.settle(task, Outcome.failed(message))
            else:
                self.outcomes.fail_before_start(task, message, [])
            return
        metrics.task_retried(self.outcomes.action_label(task))
        log.warning("%s: %s; retrying in %.0fs (the key's later tasks wait)", named(task), reason, delay,
                    extra=task_fields(task))
        self.link.send(Deferred((task.id,)))

    def wake_parked(self) -> None:
        now_ = time.monotonic()
        for parked in self.parking.due(now_):
            if parked.waiting_for_children:
                outcome = self._children_outcome(parked.head)
                if outcome is None:
                    self.parking.snooze(parked, now_)
                    continue
                tasks = self.parking.unpark(parked)
                self.outcomes.settle(parked.head, outcome)
                tasks = tasks[1:]  # the head has ended
            else:
                tasks = self.parking.unpark(parked)
                log.info("task %s: retrying (%s)", parked.head.id, parked.reason, extra=task_fields(parked.head))
            self.queue.extendleft(reversed(tasks))

    def _children_outcome(self, parent: TaskRow) -> Outcome | None:
        """The parent's outcome once every task it queued has ended; None while some run."""
        children = task_writes.children_of(self.store, parent.id)
        self.store.rollback()
        if any(c["state"] not in TERMINAL_STATES for c in children):
            return None
        bad = [c for c in children if c["state"] != TaskState.FINISHED]
        # What finished tasks had to say (clear_vms: a saved VM that stays) belongs in the parent's message.
        notes = "".join(f"; task {c['id']}: {c['message']}" for c in children
                        if c["state"] == TaskState.FINISHED and c["message"])
        if not bad:
            return Outcome.finished(f"all {len(children)} tasks it queued finished{notes}")
        details = "; ".join(f"task {c['id']} ({c['action']} {c['task_target_type']} {c['task_target_id']}) "
                            f"{c['state']}: {c['message'] or 'no message'}" for c in bad)
        return Outcome.failed(f"{len(bad)} of {len(children)} tasks it queued did not finish: {details}{notes}")
