"""A shard: runs the tasks the fetcher routes to it, one at a time, in order.

The shard owns its task writes. Before a task's action touches a node, the
shard commits ``running`` (refused if the task was canceled or is no longer
ours) together with the resource's transient state. The outcome is taken when
the action returns and written with the next start, or at once when the shard
falls idle; either way before the fetcher hears the task ended.

Quick tasks go in batches: when the actions at the front of the queue are
expected (from what they took here before) to take less than
``BATCH_BUDGET`` together, the shard marks a batch of them, of different
keys, ``running`` in one transaction, performs them one after another, and
writes their outcomes with the next batch's start. So a no-op costs a share
of one commit instead of a commit of its own, while a slow action still
starts alone, and nothing sits ``running`` for long before it really starts
(``time_started`` is rewritten with the moment it did). A crash mid-batch
leaves a few ``running`` tasks, each settled by reconciliation as usual.

A task the fetcher sends with state ``running`` was interrupted by a crash:
the shard reconciles it against the real state before anything else.

Multihost fencing: every write for a task first checks, in its transaction,
that the task's key claim is still ours under the task's token and that our
lease is live (``hold_key_claim``, which also locks the claim against a
takeover until the write commits). And the shard starts a task only while
the fetcher's last renewal is recent enough (``lease_until``), checked again
between committing ``running`` and touching the node.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
from multiprocess.connection import Connection, wait

from taskomatic import config as config_mod
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
from taskomatic.actions.connections import LibvirtConnections
from taskomatic.actions.registry import load_actions
from taskomatic.config import Config
from taskomatic.db.store import Store
from taskomatic.logsetup import set_process_title, setup_logging
from taskomatic.model import Settlement, TaskRow, key_of
from taskomatic.runtime import channel as wire
from taskomatic.runtime.lease import lease_clock, limit_idle_transaction
from taskomatic.runtime.messages import (
    Deferred,
    Drain,
    Drained,
    Ended,
    Hello,
    Performed,
    Run,
    Started,
    TaskEnd,
)
from taskomatic.runtime.parking import ParkingLot
from taskomatic.text import first_line, quoted

log = logging.getLogger(__name__)

_RECONNECT_SECONDS = 1.0
T = TypeVar("T")

# Batches: tasks whose actions are expected to take this long together start
# in one transaction. An action not yet seen here counts as the whole budget,
# so it starts alone until it has shown it is quick.
BATCH_BUDGET = 0.002
BATCH_MAX = 64
BATCH_SCAN = 256  # queue entries looked at to fill a batch
# Falling idle with outcomes held: how long to wait for the next task (the
# fetcher sends it on Performed), whose start then commits them too.
NEXT_TASK_WAIT = 0.002
ESTIMATE_WEIGHT = 0.2  # of the newest duration in an action's running estimate


# What _begin did.
_STARTED, _NOT_OURS, _HANDLED = "started", "not ours", "handled"
_DB_ATTEMPTS = 3
_CONFLICTS = (psycopg2.errors.DeadlockDetected, psycopg2.errors.SerializationFailure)
_CONNECTION_LOST = (psycopg2.OperationalError, psycopg2.InterfaceError)


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class PendingOutcome:
    task: TaskRow
    outcome: Outcome
    time_started: datetime | None
    time_ended: datetime
    # Set when the real outcome's row changes were refused and this is the fallback.
    unrecordable: bool = False

    def end(self) -> TaskEnd:
        seconds = None if self.time_started is None else (self.time_ended - self.time_started).total_seconds()
        return TaskEnd(self.task.id, self.outcome.state, seconds, self.task.action)


class _FetcherGone(Exception):
    """The fetcher died while a batch was being prepared: the batch must not start."""


class _WorkRefused(Exception):
    """The database refused a transaction's own work, after its held outcomes were written fine."""

    def __init__(self, error: psycopg2.DatabaseError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class BatchStart:
    """What starting a batch did, acted on once its transaction committed."""

    run: list[tuple[TaskRow, Action, Plan]] = field(default_factory=list)  # marked running: perform these
    done: list[tuple[TaskRow, Outcome]] = field(default_factory=list)  # already done: outcome recorded
    failed: list[tuple[TaskRow, str]] = field(default_factory=list)  # could not start: recorded failed
    retry: list[tuple[TaskRow, str]] = field(default_factory=list)  # transient: park for a retry
    refused: list[TaskRow] = field(default_factory=list)  # marking refused: canceled, ended, or ours to settle
    ends: list[TaskEnd] = field(default_factory=list)  # for the fetcher


def _named(task: TaskRow) -> str:
    """How log lines name a task: "task 12 (start_vm Vm:3)"; row text shortened (it is input)."""
    return f"task {task.id} ({_short(task.action)} {_short(task.target_type)}:{task.target_id})"


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


class Shard:
    def __init__(self, slot: int, shards: int, config: Config, instance_id: int,
                 fetcher_socket: str, deadline: Any, lease_until: Any) -> None:
        self.slot = slot
        self.multihost = config.mode == "multihost"
        self.lease_until = lease_until  # multiprocess Value('d') on lease.lease_clock; the fetcher renews it
        self.shards = shards
        self.config = config
        self.instance_id = instance_id
        self.fetcher_socket = fetcher_socket
        self.deadline = deadline  # multiprocess Value('d'): 0 when idle
        self.queue: deque[TaskRow] = deque()
        # Outcomes taken, not yet committed: written with the next start (at most one per key).
        self.pending: list[PendingOutcome] = []
        self.channel: Connection | None = None
        self.estimates: dict[str, float] = {}  # action -> running estimate of its duration (s)
        self.signals: list[int] = []
        self.stop_fast = False
        self.draining = False
        self.store = Store.open(config.dsn, f"taskomatic shard {slot}", config.connect_timeout)
        self.actions: dict[str, Action] = load_actions()
        self.ctx = ActionContext(self.store, config,
                                 LibvirtConnections(config.keepalive_interval, config.keepalive_count),
                                 lease_ok=self._lease_ok)
        self.parking = ParkingLot(config.retry_limit, config.retry_backoff_max)

    # -- signals: the handler only records; the loop acts ---------------------
    def _record_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self._reload()
            else:  # SIGINT / SIGTERM: the supervisor wants us gone after this task
                self.stop_fast = True

    def _reload(self) -> None:
        try:
            self.config = self.ctx.config = config_mod.reload(self.config)
        except config_mod.ConfigError as exc:
            log.error("reload refused, keeping the old configuration: %s", exc)

    # -- channel to the fetcher -------------------------------------------------
    def _connect(self) -> bool:
        # Settle the last outcomes first, and hold nothing unstarted: a new fetcher
        # sends every unfinished task again (what was set aside after the link broke
        # mid-batch too: a parked task, or one put back for its lease).
        self._flush()
        self._drop_unstarted()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.fetcher_socket)
        except OSError as exc:
            sock.close()
            log.debug("fetcher not reachable yet: %s", exc)
            return False
        self.channel = Connection(sock.detach())
        wire.send(self.channel, Hello(self.slot, os.getpid()))
        return True

    def _lost_fetcher(self) -> None:
        """The fetcher is gone: drop what has not started; its successor sends it again.

        The successor may give those tasks to any shard, so this one must not
        run them. What is committed ``running`` (the rest of a batch) is
        finished first; the successor sends such a task only to the slot that
        marked it (``run_by_shard``), so it comes back here to be settled.
        """
        self.channel = None
        log.warning("lost the fetcher; dropped %d tasks that had not started (they are sent again)",
                    self._drop_unstarted())

    def _drop_unstarted(self) -> int:
        dropped = len(self.queue) + len(self.parking.release_all())
        self.queue.clear()
        return dropped

    def _fetcher_gone(self) -> bool:
        """Has the fetcher that sent us our tasks died? Reads what it sent meanwhile.

        Checked just before a batch is marked running: a fetcher's successor may
        already have sent those tasks to another shard (it does not wait for a
        shard stuck in a long prepare forever), so they must not start here.
        """
        self._receive(0)
        return self.channel is None

    def _send(self, message: object) -> None:
        if self.channel is None:
            return
        try:
            wire.send(self.channel, message)
        except (OSError, EOFError):
            self._lost_fetcher()

    def _receive(self, timeout: float) -> None:
        if self.channel is None:
            return
        try:
            ready = wait([self.channel], timeout)
            while ready:
                message = wire.recv(self.channel)
                if isinstance(message, Run):
                    self.queue.extend(message.tasks)
                elif isinstance(message, Drain):
                    self.draining = True
                ready = wait([self.channel], 0)
        except (OSError, EOFError):
            self._lost_fetcher()

    # -- main loop ----------------------------------------------------------------
    def serve(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._record_signal)
        last_attempt = 0.0
        while True:
            self._handle_signals()
            if self.channel is None and time.monotonic() - last_attempt >= _RECONNECT_SECONDS:
                last_attempt = time.monotonic()
                self._connect()
            if not self.queue and self.pending and self.channel is not None:
                self._receive(NEXT_TASK_WAIT)
            if not self.queue:
                self._flush()  # falling idle: the last outcome must not wait longer for a next task
                if self.channel is None:
                    time.sleep(_RECONNECT_SECONDS / 5)  # fetcher away, nothing to do: retry soon
            self._receive(self._idle_wait())
            if self.stop_fast or self.draining:
                self._flush()
                if self.draining:
                    # Parked heads that had started stay 'running': the next start reconciles them.
                    returned = [t.id for t in self.queue] + self.parking.held_ids()
                    self._send(Drained(tuple(returned)))
                return 0
            if self.queue and not self._lease_ok():
                self._flush()  # the database may still take it: its lease outlasts ours
                self._receive(_RECONNECT_SECONDS / 5)  # wait for a renewal; the supervisor rejoins if it is lost
                continue
            self._wake_parked()
            if self.queue:
                if self.parking.is_parked(self.queue[0]):
                    task = self.queue.popleft()
                    self.parking.hold_behind(task)  # its key waits for a retry or for children
                    self._send(Deferred((task.id,)))
                    continue
                batch = self._take_batch()
                if batch[0].state == "queued":
                    self._run_batch(batch)
                else:
                    self.run_task(batch[0])  # to reconcile first

    def _lease_ok(self) -> bool:
        return lease_clock() < self.lease_until.value

    def _fenced(self, tasks: list[TaskRow]) -> list[TaskRow]:
        """Multihost: those of ``tasks`` whose key claim is still ours (and our lease live), locked.

        The others are logged and counted as refused writes. Standalone: all of them.
        """
        if not self.multihost or not tasks:
            return tasks
        claimed = [t for t in tasks if t.token is not None]
        held = {(r["key_type"], r["key_id"], r["token"]) for r in self.store.all(
            "hold_key_claims", instance_id=self.instance_id, key_types=[t.key_type for t in claimed],
            key_ids=[t.key_id for t in claimed], tokens=[t.token for t in claimed])} if claimed else set()
        allowed = []
        for task in tasks:
            if (task.key_type, task.key_id, task.token) in held:
                allowed.append(task)
                continue
            metrics.write_fenced()
            log.warning("%s: write refused: the key claim (token %s) or our lease is no "
                        "longer ours", _named(task), task.token)
        return allowed

    def _fenced_out(self, task: TaskRow) -> bool:
        return not self._fenced([task])

    def _idle_wait(self) -> float:
        if self.queue:
            return 0.0
        wake = self.parking.next_wake()
        return 0.5 if wake is None else max(0.0, min(0.5, wake - time.monotonic()))

    # -- parked keys ------------------------------------------------------------
    def _wake_parked(self) -> None:
        now = time.monotonic()
        for parked in self.parking.due(now):
            if parked.waiting_for_children:
                outcome = self._children_outcome(parked.head)
                if outcome is None:
                    self.parking.snooze(parked, now)
                    continue
                tasks = self.parking.unpark(parked)
                self._settle(parked.head, outcome)
                tasks = tasks[1:]  # the head has ended
            else:
                tasks = self.parking.unpark(parked)
                log.info("task %s: retrying (%s)", parked.head.id, parked.reason)
            self.queue.extendleft(reversed(tasks))

    def _children_outcome(self, parent: TaskRow) -> Outcome | None:
        """The parent's outcome once every task it queued has ended; None while some run."""
        children = self.store.all("children_of", task_id=parent.id)
        self.store.rollback()
        if any(c["state"] not in ("finished", "failed", "canceled") for c in children):
            return None
        bad = [c for c in children if c["state"] != "finished"]
        # What finished tasks had to say (clear_vms: a saved VM that stays) belongs in the parent's message.
        notes = "".join(f"; task {c['id']}: {c['message']}" for c in children
                        if c["state"] == "finished" and c["message"])
        if not bad:
            return Outcome.finished(f"all {len(children)} tasks it queued finished{notes}")
        details = "; ".join(f"task {c['id']} ({c['action']} {c['task_target_type']} {c['task_target_id']}) "
                            f"{c['state']}: {c['message'] or 'no message'}" for c in bad)
        return Outcome.failed(f"{len(bad)} of {len(children)} tasks it queued did not finish: {details}{notes}")

    def _park_for_retry(self, task: TaskRow, reason: str) -> None:
        delay = self.parking.park_for_retry(task, reason, time.monotonic())
        if delay is None:
            count = self.parking.failures.pop(task.id, 0)
            message = f"gave up after {count} transient failures: {reason}"
            if task.state == "running":  # it had started: the real state is for the reconciler now
                self._settle(task, Outcome.failed(message))
            else:
                self._fail_before_start(task, message, [])
            return
        metrics.task_retried(self._action_label(task))
        log.warning("%s: %s; retrying in %.0fs (the key's later tasks wait)",
                    _named(task), reason, delay)
        self._send(Deferred((task.id,)))

    # -- batches -----------------------------------------------------------------
    def _estimate(self, task: TaskRow) -> float:
        return self.estimates.get(task.action, BATCH_BUDGET)

    def _learn(self, task: TaskRow, seconds: float) -> None:
        old = self.estimates.get(task.action)
        self.estimates[task.action] = seconds if old is None else old + ESTIMATE_WEIGHT * (seconds - old)

    def _take_batch(self) -> list[TaskRow]:
        """Take the next task and, if it is quick, more quick ones of other keys to start with it.

        A key's first task in the queue may join; its later ones never jump
        ahead of it, and a task left behind (slow, parked, to be reconciled)
        holds its key's later tasks back too.
        """
        first = self.queue.popleft()
        budget = self._estimate(first)
        if first.state != "queued" or budget >= BATCH_BUDGET:
            return [first]
        batch = [first]
        seen = {key_of(first)}
        skipped: list[TaskRow] = []
        for _ in range(min(len(self.queue), BATCH_SCAN)):
            task = self.queue.popleft()
            key = key_of(task)
            quick = budget + self._estimate(task) < BATCH_BUDGET
            if key in seen or task.state != "queued" or self.parking.is_parked(task) or not quick:
                skipped.append(task)
                seen.add(key)
                if not quick or len(batch) >= BATCH_MAX:
                    break
                continue
            seen.add(key)
            batch.append(task)
            budget += self._estimate(task)
            if len(batch) >= BATCH_MAX:
                break
        self.queue.extendleft(reversed(skipped))
        return batch

    def _run_batch(self, batch: list[TaskRow]) -> None:
        """Start a batch in one transaction (with the held outcomes), then perform it in order."""
        try:
            started = self._commit_with_pending(lambda: self._start_batch(batch))
        except _FetcherGone:
            self.store.rollback()
            log.warning("lost the fetcher before starting %d tasks; they are sent again", len(batch))
            return
        except (TaskFailed, TaskRetry, psycopg2.DatabaseError) as exc:
            if isinstance(exc, _CONNECTION_LOST):
                raise
            # One task's start was refused, and with it the batch's: start them one by one.
            self.store.rollback()
            self._flush()
            for task in batch:
                self.run_task(task)
            return
        for task, message in started.failed:
            self.parking.ended(task.id)
            metrics.task_ended(self._action_label(task), "failed", None)
            log.warning("%s failed: %s", _named(task), message)
        for task, outcome in started.done:
            self._log_outcome(task, outcome)
        self._send_ended(*started.ends)
        for task, reason in started.retry:
            self._park_for_retry(task, reason)
        for task in started.refused:
            self._not_started(task)
        if not started.run:
            return
        self._send(Started(tuple(t.id for t, _, _ in started.run)))
        for position, (task, action, plan) in enumerate(started.run):
            if not self._lease_ok():
                # Committed 'running', not started: settled by reconciliation once the lease is back.
                log.warning("lease too old to start %d tasks of a batch; holding them", len(started.run) - position)
                self.queue.extendleft(reversed([replace(t, state="running") for t, _, _ in started.run[position:]]))
                return
            self.deadline.value = time.time() + self.config.task_timeout
            try:
                self._perform(task, action, plan)
            finally:
                self.deadline.value = 0.0
        self._say_performed()

    def _say_performed(self) -> None:
        """Tell the fetcher which tasks ran and wait for a commit: it may send the next ones now."""
        if self.pending:
            self._send(Performed(tuple(p.task.id for p in self.pending)))

    def _start_batch(self, batch: list[TaskRow]) -> BatchStart:
        """In the transaction that wrote the held outcomes: prepare, then mark running and begin.

        Prepare runs after those writes, so a task sees its key's previous
        outcome in the rows without a commit of its own in between. A task
        that cannot start fails here, in the same transaction; a transient
        failure is parked after the commit. A database error, or a begin that
        refuses, rolls the batch back (the caller then starts its tasks one by one).
        """
        result = BatchStart()
        prepared: list[tuple[TaskRow, Action, Plan]] = []
        failing: list[tuple[TaskRow, str, list[RowUpdate]]] = []
        self.deadline.value = time.time() + self.config.task_timeout
        try:
            for task in batch:
                try:
                    action = self._check(task)
                    prepared.append((task, action, action.prepare(self.ctx, task)))
                except TaskFailed as failure:
                    failing.append((task, failure.message, failure.row_updates))
                except TaskRetry as retry:
                    result.retry.append((task, retry.message))
                except psycopg2.DatabaseError:
                    raise
                except Exception as exc:  # a bug must cost one task, not the shard
                    log.exception("task %s: unexpected error while preparing", task.id)
                    failing.append((task, f"internal error while preparing {task.action}: {exc!r}", []))
        finally:
            self.deadline.value = 0.0
        if self._fetcher_gone():
            raise _FetcherGone
        allowed = {t.id for t in self._fenced([t for t, _, _ in prepared] + [t for t, _, _ in failing])}
        moment = now()
        to_mark = [t.id for t, _, _ in prepared if t.id in allowed]
        marked = {r["id"] for r in self.store.all(
            "mark_running", task_ids=to_mark, instance_id=self.instance_id, time_started=moment,
            shard=self.slot)} if to_mark else set()
        done: list[PendingOutcome] = []
        for task, action, plan in prepared:
            if task.id not in marked:
                if task.id in allowed:
                    result.refused.append(task)
                else:
                    result.ends.append(TaskEnd(task.id, "skipped"))
            elif plan.already_done is not None:
                done.append(PendingOutcome(task, plan.already_done, moment, moment))
            else:
                plan.begin(self.store)
                result.run.append((task, action, plan))
        written = self._write(done) if done else set()
        for pending in done:
            if pending.task.id in written:
                result.done.append((pending.task, pending.outcome))
            result.ends.append(TaskEnd(pending.task.id, pending.outcome.state if pending.task.id in written
                                       else "skipped"))
        for task, message, updates in failing:
            recorded = task.id in allowed and self.store.one(
                "fail_unstartable", task_id=task.id, instance_id=self.instance_id, message=message,
                time=moment) is not None
            if recorded:
                for update in updates:
                    self.store.update_row(update.table, update.row_id, update.values)
                result.failed.append((task, message))
            result.ends.append(TaskEnd(task.id, "failed" if recorded else "skipped"))
        return result

    def _not_started(self, task: TaskRow) -> None:
        """Marking a queued task running was refused: settle it if an earlier shard of ours left it running."""
        if task.state == "queued" and self._interrupted(task):
            self._run(replace(task, state="running"))
        else:
            self._send_ended(TaskEnd(task.id, "skipped"))

    # -- one task ---------------------------------------------------------------
    def _check(self, task: TaskRow) -> Action:
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

    def run_task(self, task: TaskRow) -> None:
        # The supervisor kills a shard still on one task past this moment (wall clock,
        # shared memory): the last resort against a libvirt call that never returns.
        self.deadline.value = time.time() + self.config.task_timeout
        try:
            self._run_task(task)
        finally:
            self.deadline.value = 0.0

    def _run_task(self, task: TaskRow) -> None:
        try:
            done = self._run(task)
        except psycopg2.DatabaseError as exc:
            if isinstance(exc, _CONNECTION_LOST):
                raise
            self.store.rollback()
            log.error("task %s: the database refused a write: %s", task.id, first_line(exc))
            self._fail_before_start(task, f"the database refused {task.action}'s changes: {first_line(exc)}", [])
            return
        if not done:
            self._not_started(task)

    def _run(self, task: TaskRow) -> bool:
        """Run or settle one task. False: it was not ours to start (canceled, ended, taken)."""
        if any(key_of(p.task) == key_of(task) for p in self.pending):
            self._flush()  # this task must see its predecessor's effects in the rows
        rerun = False
        try:
            action = self._check(task)
            if task.state == "running":
                settled = action.reconcile(self.ctx, task)
                self.store.rollback()
                log.info("%s reconciled: %s: %s", _named(task), settled.kind, settled.message)
                metrics.task_reconciled(settled.kind)
                if settled.kind == Settlement.DONE:
                    return self._settle(task, Outcome.finished(settled.message, *settled.row_updates))
                if settled.kind == Settlement.NEITHER:
                    return self._settle(task, Outcome.failed(settled.message, *settled.row_updates))
                if settled.kind == Settlement.WAITING:
                    self.parking.park_for_children(task, settled.message, time.monotonic())
                    self._send(Deferred((task.id,)))
                    return True
                rerun = True
            plan = action.prepare(self.ctx, task)
            self.store.rollback()
        except TaskFailed as failure:
            self.store.rollback()
            self._fail_before_start(task, failure.message, failure.row_updates)
            return True
        except TaskRetry as retry:
            self.store.rollback()
            self._park_for_retry(task, retry.message)
            return True
        except Exception as exc:  # a bug must cost one task, not the shard
            if isinstance(exc, _CONNECTION_LOST):
                raise
            self.store.rollback()
            log.exception("task %s: unexpected error while preparing", task.id)
            self._fail_before_start(task, f"internal error while preparing {task.action}: {exc!r}", [])
            return True
        if plan.already_done is not None:
            return self._settle(task, plan.already_done, mark_running=not rerun)
        began = self._begin(task, plan, rerun)
        if began != _STARTED:
            return began == _HANDLED
        if not self._lease_ok():
            # Committed 'running', not started: once the lease is renewed it is reconciled
            # ("not started") and runs; if it is lost, the key's next owner does that.
            log.warning("task %s: lease too old to start it now; holding it", task.id)
            self.queue.appendleft(replace(task, state="running"))
            return True
        self._send(Started((task.id,)))
        self._perform(task, action, plan)
        self._say_performed()
        return True

    def _perform(self, task: TaskRow, action: Action, plan: Plan) -> None:
        """Perform a task committed running; its outcome is held for the next commit."""
        started = now()
        metrics.task_started(self.config.dsn, task.id, started)
        try:
            outcome = action.perform(self.ctx, plan)
        except LeaseExpired:
            # Stopped between two steps: settled by reconciliation, like a crash there.
            self.store.rollback()
            log.warning("%s: lease too old to go on; left to reconciliation", _named(task))
            self.queue.appendleft(replace(task, state="running"))
            return
        except TaskRetry as retry:
            self.store.rollback()
            self._park_for_retry(replace(task, state="running"), retry.message)
            return
        except Exception as exc:
            log.exception("task %s: unexpected error in %s", task.id, task.action)
            outcome = Outcome.failed(f"internal error in {task.action}: {exc!r}")
        ended = now()
        self.store.rollback()  # end any read transaction the action left open
        self._learn(task, (ended - started).total_seconds())
        if outcome.state == "waiting":
            log.info("%s waiting: %s", _named(task), outcome.message)
            self.parking.park_for_children(replace(task, state="running"), outcome.message or "", time.monotonic())
            self._send(Deferred((task.id,)))
            return
        self.pending.append(PendingOutcome(task, outcome, started, ended))
        self._log_outcome(task, outcome, (ended - started).total_seconds())

    def _commit_with_pending(self, work: Callable[[], T]) -> T:
        """Run ``work`` in one transaction that also writes the held outcomes.

        The fetcher hears a task ended only after its outcome is committed, so
        it never forgets a task whose end could still be lost. A lock conflict
        (deadlock, serialization failure) is retried; if the database refuses
        a held outcome's row changes, that outcome is recorded as failed with
        the reason instead, so one bad write cannot wedge the shard. A lost
        connection is not handled here: the shard exits, and its replacement
        reconciles.
        """
        for attempt in range(1, _DB_ATTEMPTS + 1):
            try:
                return self._commit_once(work)
            except _CONFLICTS as exc:
                self.store.rollback()
                log.warning("database conflict (%s), retrying (%d/%d)", type(exc).__name__, attempt, _DB_ATTEMPTS)
                if attempt == _DB_ATTEMPTS:
                    raise
            except _WorkRefused as refused:
                # Not the held outcomes' fault: write them alone, then report the refusal.
                self.store.rollback()
                self._flush()
                raise refused.error from None
            except psycopg2.DatabaseError as exc:
                if isinstance(exc, _CONNECTION_LOST) or not self.pending:
                    raise
                self.store.rollback()
                if len(self.pending) > 1:
                    self._flush_each()  # find the outcome the database refuses
                    continue
                held = self.pending[0]
                if held.unrecordable:
                    raise
                log.error("task %s: the database refused its result: %s", held.task.id, first_line(exc))
                self.pending = [PendingOutcome(held.task, Outcome.failed(
                    f"{held.task.action} ran ({held.outcome.state}), but the database refused its result: "
                    f"{first_line(exc)}"), held.time_started, held.time_ended, unrecordable=True)]
        raise AssertionError("unreachable")

    def _flush_each(self) -> None:
        """Write the held outcomes one transaction each (after a batch of them was refused)."""
        outcomes, self.pending = self.pending, []
        for outcome in outcomes:
            self.pending = [outcome]
            self._commit_with_pending(lambda: None)

    def _commit_once(self, work: Callable[[], T]) -> T:
        flushed: list[PendingOutcome] = []
        try:
            with self.store.transaction():
                limit_idle_transaction(self.store, self.config)
                if self.pending:
                    self._write(self.pending)
                    flushed, self.pending = self.pending, []
                try:
                    result = work()
                except psycopg2.DatabaseError as exc:
                    if flushed and not isinstance(exc, _CONNECTION_LOST + _CONFLICTS):
                        raise _WorkRefused(exc) from exc
                    raise
        except BaseException:
            self.pending = flushed + self.pending  # rolled back: hold them again
            raise
        if flushed:
            self._send_ended(*(p.end() for p in flushed))
        return result

    def _send_ended(self, *ends: TaskEnd) -> None:
        self._send(Ended(ends))

    def _mark(self, task: TaskRow, rerun: bool, moment: datetime) -> bool:
        if self._fenced_out(task):
            return False
        if rerun:
            marked = self.store.one("mark_rerun", task_id=task.id, instance_id=self.instance_id,
                                    time_started=moment, shard=self.slot) is not None
        else:
            marked = bool(self.store.all("mark_running", task_ids=[task.id], instance_id=self.instance_id,
                                         time_started=moment, shard=self.slot))
        if not marked:
            log.info("task %s was canceled, has ended or is no longer ours; skipped", task.id)
        return marked

    def _interrupted(self, task: TaskRow) -> bool:
        """Is this 'queued' copy really a task this slot's earlier shard left running?

        A copy can be stale (sent again after a fetcher restart, while this
        slot's shard was finishing it); the task must then be reconciled, not
        skipped. Only the slot that marked it may: another may still run it.
        """
        row = self.store.one("task_states", ids=[task.id])
        self.store.rollback()
        return bool(row and row["state"] == "running" and row["claimed_by"] == self.instance_id
                    and row["run_by_shard"] == self.slot)

    def _begin(self, task: TaskRow, plan: Plan, rerun: bool) -> str:
        """Commit 'running' + transient state (and the held outcomes).

        STARTED: perform it now. NOT_OURS: canceled, ended or taken meanwhile.
        HANDLED: it failed or was parked for a retry before it started.
        """

        def work() -> bool:
            if not self._mark(task, rerun, now()):
                return False
            plan.begin(self.store)
            return True

        try:
            return _STARTED if self._commit_with_pending(work) else _NOT_OURS
        except TaskFailed as failure:
            self._fail_before_start(task, failure.message, failure.row_updates)
            return _HANDLED
        except TaskRetry as retry:  # rolled back: the task is still queued
            self._park_for_retry(task, retry.message)
            return _HANDLED

    def _settle(self, task: TaskRow, outcome: Outcome, mark_running: bool = False) -> bool:
        """Write an outcome decided without performing anything (no-op success, reconciliation)."""
        moment = now()

        def work() -> bool:
            if mark_running and not self._mark(task, False, moment):
                return False
            return bool(self._write([PendingOutcome(task, outcome, moment if mark_running else None, moment)]))

        written = self._commit_with_pending(work)
        if written:
            self._log_outcome(task, outcome)
            self._send_ended(TaskEnd(task.id, outcome.state))
        return written

    def _fail_before_start(self, task: TaskRow, message: str, updates: list[RowUpdate]) -> None:
        moment = now()

        def work() -> bool:
            if self._fenced_out(task):
                return False
            failed = self.store.one("fail_unstartable", task_id=task.id, instance_id=self.instance_id,
                                    message=message, time=moment)
            if failed is not None:
                for update in updates:
                    self.store.update_row(update.table, update.row_id, update.values)
            return True

        recorded = self._commit_with_pending(work)
        self.parking.ended(task.id)
        if recorded:  # a fenced-out write was logged as refused; the task is not ours to fail
            metrics.task_ended(self._action_label(task), "failed", None)
            log.warning("%s failed: %s", _named(task), message)
        self._send_ended(TaskEnd(task.id, "failed" if recorded else "skipped"))

    # -- outcomes ---------------------------------------------------------------
    def _write(self, outcomes: list[PendingOutcome]) -> set[int]:
        """Write outcomes and their row changes, those we may; the ids written."""
        allowed = {t.id for t in self._fenced([p.task for p in outcomes])}
        todo = [p for p in outcomes if p.task.id in allowed]
        if not todo:
            return set()
        written = {r["id"] for r in self.store.all(
            "record_outcomes", instance_id=self.instance_id, task_ids=[p.task.id for p in todo],
            states=[p.outcome.state for p in todo], messages=[p.outcome.message for p in todo],
            starts=[p.time_started for p in todo], ends=[p.time_ended for p in todo])}
        for pending in todo:
            if pending.task.id not in written:
                # Fencing: someone else owns the task now; our rows must not overwrite theirs.
                log.warning("task %s: outcome %s not recorded, the task is no longer ours",
                            pending.task.id, pending.outcome.state)
                continue
            for update in pending.outcome.row_updates:
                self.store.update_row(update.table, update.row_id, update.values)
        return written

    def _flush(self) -> None:
        if self.pending:
            self._commit_with_pending(lambda: None)

    def _action_label(self, task: TaskRow) -> str:
        # Only known names become metric labels: a hostile action string must not mint series.
        return task.action if task.action in self.actions else "unknown"

    def _log_outcome(self, task: TaskRow, outcome: Outcome, seconds: float | None = None) -> None:
        self.parking.ended(task.id)
        metrics.task_ended(self._action_label(task), outcome.state, seconds)
        # A routine success is a debug line: at thousands of tasks a second, info lines would
        # flood the journal (journald drops a unit's lines beyond 10,000 per 30 s by default);
        # the tasks table and `taskomatic tasks --follow` are the record of every task.
        level = logging.DEBUG if outcome.state == "finished" else logging.WARNING
        log.log(level, "%s %s%s", _named(task),
                outcome.state, f": {outcome.message}" if outcome.message else "")


def shard_main(slot: int, shards: int, config: Config, instance_id: int,
               fetcher_socket: str, deadline: Any, lease_until: Any) -> None:
    """Entry point of a shard process (spawned, so it starts with nothing inherited)."""
    setup_logging(config.log_level, role=f"instance {instance_id} shard {slot}")
    set_process_title(f"taskomatic: shard {slot}/{shards}")
    # A shard runs until told; a terminal's Ctrl-C goes to the whole group and
    # the supervisor decides what it means.
    try:
        shard = Shard(slot, shards, config, instance_id, fetcher_socket, deadline, lease_until)
    except KeyboardInterrupt:  # the supervisor stopping everything while we started (a rejoin)
        raise SystemExit(0) from None
    except Exception:
        log.exception("shard %d failed to start", slot)
        raise SystemExit(3) from None
    try:
        code = shard.serve()
    except _CONNECTION_LOST as exc:
        # Expected when the database restarts or ends a frozen session: the supervisor
        # replaces this shard, and its interrupted task is reconciled. One line, no traceback.
        log.error("shard %d lost its database connection (%s); exiting to be replaced", slot, first_line(exc))
        raise SystemExit(1) from None
    raise SystemExit(code)

