"""In-memory stand-ins for a shard's surroundings: the store, the fetcher link, actions.

Only for fast unit tests of the shard's logic (execution, outcomes); the
integration and acceptance tests run the real shard against PostgreSQL and
libvirt. The fake store answers the named queries a shard runs, with the same
rules the SQL applies (only the holder writes, only once), and keeps
uncommitted writes apart so a rollback really undoes them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from taskomatic.actions.base import ActionContext, Outcome, Plan, Reconciled, RowUpdate, TaskFailed
from taskomatic.config import Config
from taskomatic.model import Settlement, TaskRow, TaskState
from taskomatic.runtime.execution import Execution, ShardLink
from taskomatic.runtime.outcomes import Outcomes
from taskomatic.runtime.parking import ParkingLot

INSTANCE = 1
SLOT = 0


@dataclass
class FakeDb:
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)
    rows: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    # Multihost partition leases held: (partition, token).
    leases: set[tuple[int, int]] = field(default_factory=set)


class FakeStore:
    def __init__(self) -> None:
        self.committed = FakeDb()
        self.work = FakeDb()
        self.commits = 0
        self.update_log: list[tuple[str, int, dict[str, Any]]] = []  # committed row updates, in order
        self._pending_log: list[tuple[str, int, dict[str, Any]]] = []
        # name -> how many more times it raises this error (to test retries and refusals)
        self.failures: dict[str, list[Exception]] = {}
        self.refuse_values: Callable[[dict[str, Any]], bool] = lambda values: False
        # The named queries of each committed transaction, in order ("*" ahead of one that was
        # its transaction's last statement, sent with all_last(..., True)).
        self.transactions: list[list[str]] = []
        self._statements: list[str] = []
        # A last statement sent alone was committed by the server: nothing may follow it in "its" transaction.
        self._committed_alone = False

    # -- set-up --------------------------------------------------------------
    def add_task(self, task: TaskRow, state: str = "queued", run_by_shard: int | None = None) -> None:
        self.committed.tasks[task.id] = {"state": state, "claimed_by": INSTANCE, "run_by_shard": run_by_shard,
                                         "message": None, "time_started": None, "time_ended": None,
                                         "attempts": 0, "parent": None, "task": task,
                                         "partition": task.partition}
        self.rollback()

    # -- the Store interface ---------------------------------------------------
    def rollback(self) -> None:
        self.work = copy.deepcopy(self.committed)
        self._pending_log = []
        self._statements = []
        self._committed_alone = False

    def commit(self) -> None:
        self.committed = copy.deepcopy(self.work)
        self.update_log += self._pending_log
        self._pending_log = []
        self.commits += 1
        if self._statements:
            self.transactions.append(self._statements)
        self._statements = []
        self._committed_alone = False

    @contextmanager
    def transaction(self) -> Iterator[FakeStore]:
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        else:
            self.commit()

    def _check_open(self) -> None:
        if self._committed_alone:
            raise AssertionError(f"a write after {self._statements[0]}, which the server committed alone")

    def update_row(self, table: str, row_id: int, values: dict[str, Any]) -> None:
        self._check_open()
        self._statements.append("update_row")
        if self.refuse_values(values):
            raise _data_error("value out of range")
        self.work.rows.setdefault((table, row_id), {}).update(values)
        self._pending_log.append((table, row_id, dict(values)))

    def one(self, name: str, /, **params: Any) -> dict[str, Any] | None:
        rows = self.all(name, **params)
        return rows[0] if rows else None

    def send_with_next(self, name: str, /, **params: Any) -> None:
        getattr(self, "_q_" + name)(**params)  # the real store sends it with the next statement; here it runs now

    def all(self, name: str, /, **params: Any) -> list[dict[str, Any]]:
        self._check_open()
        errors = self.failures.get(name)
        if errors:
            raise errors.pop(0)
        self._statements.append(name)
        return getattr(self, "_q_" + name)(**params)

    def all_last(self, name: str, last: bool, /, **params: Any) -> list[dict[str, Any]]:
        alone = last and not self._statements
        rows = self.all(name, **params)  # alone, the real store's server commits it here
        if last:
            self._statements[-1] = "*" + name
        self._committed_alone = alone
        return rows

    # -- the named queries, as the SQL has them ----------------------------------
    def _ours(self, task_id: int, instance_id: int, states: tuple[str, ...]) -> dict[str, Any] | None:
        row = self.work.tasks.get(task_id)
        return row if row and row["claimed_by"] == instance_id and row["state"] in states else None

    def _q_mark_running(self, task_ids: list[int], instance_id: int, time_started: Any, shard: int) -> list[dict]:
        out = []
        for task_id in task_ids:
            row = self._ours(task_id, instance_id, ("queued",))
            if row:
                row.update(state="running", time_started=time_started, run_by_shard=shard,
                           attempts=row["attempts"] + 1)
                out.append({"id": task_id, "created_at": row.get("created_at")})
        return out

    def _q_mark_rerun(self, task_id: int, instance_id: int, time_started: Any, shard: int) -> list[dict]:
        row = self._ours(task_id, instance_id, ("running",))
        if not row:
            return []
        row.update(time_started=time_started, run_by_shard=shard, attempts=row["attempts"] + 1)
        return [{"id": task_id}]

    def _q_record_outcomes(self, instance_id: int, task_ids: list[int], states: list[str],
                           messages: list[str | None], starts: list[Any], ends: list[Any]) -> list[dict]:
        out = []
        for task_id, state, message, start, end in zip(task_ids, states, messages, starts, ends, strict=True):
            row = self._ours(task_id, instance_id, ("running",))
            if row:
                row.update(state=str(state), message=message, time_ended=end,
                           time_started=start if start is not None else row["time_started"])
                out.append({"id": task_id})
        return out

    def _q_fail_unstartable(self, task_id: int, instance_id: int, message: str, time: Any) -> list[dict]:
        row = self._ours(task_id, instance_id, ("queued", "running"))
        if not row:
            return []
        row.update(state="failed", message=message, time_started=time, time_ended=time,
                   attempts=row["attempts"] + 1)
        return [{"id": task_id}]

    def _q_task_states(self, ids: list[int]) -> list[dict]:
        return [{"id": i, "state": r["state"], "claimed_by": r["claimed_by"], "run_by_shard": r["run_by_shard"]}
                for i, r in self.work.tasks.items() if i in ids]

    def _q_children_of(self, task_id: int) -> list[dict]:
        return []

    def _q_limit_idle_transaction(self, ms: int) -> list[dict]:
        return []

    def _held(self, partitions: list[int], tokens: list[int]) -> set[int]:
        return {p for p, t in zip(partitions, tokens, strict=True) if (p, t) in self.work.leases}

    def _q_hold_partitions(self, instance_id: int, partitions: list[int], tokens: list[int],
                           starting: bool) -> list[dict]:
        return [{"partition": p, "token": t} for p, t in zip(partitions, tokens, strict=True)
                if p in self._held(partitions, tokens)]

    def _q_mark_running_fenced(self, instance_id: int, partitions: list[int], tokens: list[int],
                               task_ids: list[int], shard: int, time_started: Any) -> list[dict]:
        held = self._held(partitions, tokens)
        mine = [i for i in task_ids if self.work.tasks.get(i, {}).get("partition") in held]
        return self._q_mark_running(mine, instance_id, time_started, shard)

    def _q_record_outcomes_fenced(self, instance_id: int, partitions: list[int], tokens: list[int],
                                  task_ids: list[int], states: list[str], messages: list[str | None],
                                  starts: list[Any], ends: list[Any]) -> list[dict]:
        held = self._held(partitions, tokens)
        keep = [n for n, i in enumerate(task_ids) if self.work.tasks.get(i, {}).get("partition") in held]
        return self._q_record_outcomes(instance_id, [task_ids[n] for n in keep], [states[n] for n in keep],
                                       [messages[n] for n in keep], [starts[n] for n in keep],
                                       [ends[n] for n in keep])

    def _q_end_and_start(self, instance_id: int, end_ids: list[int], states: list[str], messages: list[str | None],
                         starts: list[Any], ends: list[Any], start_ids: list[int], time_started: Any,
                         shard: int) -> list[dict]:
        # Both updates see the rows as they were before the statement (their ids are disjoint).
        ended = self._q_record_outcomes(instance_id, end_ids, states, messages, starts, ends)
        started = self._q_mark_running(start_ids, instance_id, time_started, shard)
        return ([{"id": r["id"], "created_at": None, "started": False} for r in ended]
                + [{**r, "started": True} for r in started])

    def _q_end_and_start_fenced(self, instance_id: int, partitions: list[int], tokens: list[int],
                                end_ids: list[int], states: list[str], messages: list[str | None],
                                starts: list[Any], ends: list[Any], start_ids: list[int], time_started: Any,
                                shard: int) -> list[dict]:
        held = self._held(partitions, tokens)
        keep = [n for n, i in enumerate(end_ids) if self.work.tasks.get(i, {}).get("partition") in held]
        mine = [i for i in start_ids if self.work.tasks.get(i, {}).get("partition") in held]
        return self._q_end_and_start(instance_id, [end_ids[n] for n in keep], [states[n] for n in keep],
                                     [messages[n] for n in keep], [starts[n] for n in keep],
                                     [ends[n] for n in keep], mine, time_started, shard)

    # -- what tests read -------------------------------------------------------
    def task(self, task_id: int) -> dict[str, Any]:
        return self.committed.tasks[task_id]

    def row(self, table: str, row_id: int) -> dict[str, Any]:
        return self.committed.rows.get((table, row_id), {})


def _data_error(message: str) -> Exception:
    import psycopg2

    return psycopg2.DataError(message)


def task(task_id: int, vm: int, action: str = "touch", state: str = "queued", token: int | None = None) -> TaskRow:
    """A task of VM ``vm``, in partition ``vm`` (here: the fake store knows no hash)."""
    return TaskRow(task_id, "Vm", vm, action, {}, "Vm", vm, state, token, partition=vm)


class Tick:
    """A quick action that changes no rows: its outcome goes with the next start (end_and_start)."""

    name = "tick"
    target_types = ("Vm",)

    def __init__(self) -> None:
        self.performed: list[int] = []
        self.after_perform: Callable[[TaskRow], None] = lambda task: None

    def validate_args(self, args: dict[str, Any]) -> None:
        pass

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        return Plan(task)

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        self.performed.append(plan.task.id)
        self.after_perform(plan.task)
        return Outcome.finished()

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        return Reconciled(Settlement.NOT_STARTED, "tick: nothing to find")


class TouchVm:
    """A quick action: begin marks the VM busy, perform marks it touched by the task."""

    name = "touch"
    target_types = ("Vm",)

    def __init__(self) -> None:
        self.performed: list[int] = []
        self.settlement = Settlement.NOT_STARTED
        self.perform_hook: Callable[[TaskRow], None] = lambda task: None

    def validate_args(self, args: dict[str, Any]) -> None:
        if args.get("bad"):
            raise TaskFailed("bad args")

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        assert task.target_id is not None
        return Plan(task, begin_updates=[RowUpdate("vms", task.target_id, {"state": "busy"})])

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        task = plan.task
        assert task.target_id is not None
        self.perform_hook(task)
        self.performed.append(task.id)
        return Outcome.finished(None, RowUpdate("vms", task.target_id, {"state": "idle", "last_task": task.id}))

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        return Reconciled(self.settlement, f"found {self.settlement}")


@dataclass
class Rig:
    """An Execution wired to a fake store and a fake fetcher link."""

    store: FakeStore
    action: TouchVm
    execution: Execution
    outcomes: Outcomes
    sent: list[object]
    lease: dict[str, bool]

    def run_queue(self, tasks: list[TaskRow]) -> None:
        """Queue these and run batches until the queue is empty, then commit what is held (the shard's loop)."""
        self.execution.queue.extend(tasks)
        while self.execution.queue:
            self.execution.run(self.execution.take_batch())
        self.outcomes.flush()


def make_rig(multihost: bool = False, quick: bool = True) -> Rig:
    store = FakeStore()
    config = Config(mode="multihost" if multihost else "standalone")
    action = TouchVm()
    sent: list[object] = []
    lease = {"ok": True}
    parking = ParkingLot(config.retry_limit, config.retry_backoff_max)
    outcomes = Outcomes(store, config, INSTANCE, multihost, parking,  # type: ignore[arg-type]
                        lambda ends: sent.append(("ended", ends)), lambda task: task.action)
    ctx = ActionContext(store, config, SimpleNamespace())  # type: ignore[arg-type]
    actions = {"touch": action, "tick": Tick()}
    execution = Execution(SLOT, INSTANCE, config, store, ctx, actions, parking,  # type: ignore[arg-type]
                          outcomes, ShardLink(sent.append, lambda: False, lambda: lease["ok"]),
                          SimpleNamespace(value=0.0))
    if quick:
        execution.estimates["touch"] = 0.0001  # known quick: batches of several keys
        execution.estimates["tick"] = 0.0001
    return Rig(store, action, execution, outcomes, sent, lease)


def states(store: FakeStore, ids: list[int]) -> dict[int, str]:
    return {i: store.task(i)["state"] for i in ids}


TERMINAL = {TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELED}
