"""What an action is, and the registry of actions (pluggable by entry point).

An action runs in three steps, so the shard can write ``running`` and the
resource's transient state before anything touches a node:

1. ``prepare`` reads the rows and the real state (no side effects) and returns
   a Plan, or raises TaskFailed (impossible state, bad args, missing target).
   A plan may say the work is already done (a no-op success). It reads no
   ``tasks`` rows: the shard's held outcomes are written in the statement that
   marks the next tasks running, after prepare (their resource-row changes, if
   any, are written before it).
2. ``plan.begin(store)`` runs inside the transaction that marks the task
   running: it writes the transient state (and, for start_vm, the placement).
3. ``perform(plan)`` does the work on libvirt and returns an Outcome.

``reconcile`` settles a task an earlier process left ``running``: it reads the
real state and says DONE (it took effect), NOT_STARTED (run it again in its
place) or NEITHER (failed, with what was found).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from taskomatic.model import OutcomeState, Settlement, TaskRow

if TYPE_CHECKING:
    from taskomatic.actions.connections import LibvirtConnections
    from taskomatic.config import Config
    from taskomatic.db.store import Store

# Settlement and TaskRow belong to the public API of actions: a plugin may import them from here.
__all__ = [
    "ENTRY_POINT_GROUP", "Action", "ActionContext", "LeaseExpired", "Outcome", "OutcomeState", "Plan", "Reconciled",
    "RowUpdate", "Settlement", "TaskFailed", "TaskRetry", "TaskRow",
]

ENTRY_POINT_GROUP = "taskomatic.actions"


class TaskFailed(Exception):
    """The task fails with this message; ``row_updates`` correct the resource rows."""

    def __init__(self, message: str, row_updates: list[RowUpdate] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.row_updates = row_updates or []


class TaskRetry(Exception):
    """A transient failure (node unreachable, connection lost, timeout): try again later.

    The shard parks the task's key and retries with backoff; the key's later
    tasks wait behind it. A retried task that had started is settled by
    ``reconcile`` first, so a half-done action is never run twice blindly.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class RowUpdate:
    table: str
    row_id: int
    values: dict[str, Any]


@dataclass
class Outcome:
    # finished or failed; waiting (not an end): the task stays running
    # until the tasks it queued (children) have all ended.
    state: OutcomeState
    message: str | None = None
    row_updates: list[RowUpdate] = field(default_factory=list)

    @classmethod
    def waiting(cls, message: str) -> Outcome:
        return cls(OutcomeState.WAITING, message)

    @classmethod
    def finished(cls, message: str | None = None, *updates: RowUpdate) -> Outcome:
        return cls(OutcomeState.FINISHED, message, list(updates))

    @classmethod
    def failed(cls, message: str, *updates: RowUpdate) -> Outcome:
        return cls(OutcomeState.FAILED, message, list(updates))


@dataclass
class Plan:
    """What prepare decided. ``already_done`` plans skip perform."""

    task: TaskRow
    begin_updates: list[RowUpdate] = field(default_factory=list)
    already_done: Outcome | None = None
    # Extra work inside the mark-running transaction (placement); may raise TaskFailed.
    begin_hook: Callable[[Store], None] | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def begin(self, store: Store) -> None:
        if self.begin_hook is not None:
            self.begin_hook(store)
        for update in self.begin_updates:
            store.update_row(update.table, update.row_id, update.values)


@dataclass
class Reconciled:
    kind: Settlement
    message: str
    row_updates: list[RowUpdate] = field(default_factory=list)


class LeaseExpired(Exception):
    """Multihost: the instance's lease is too old to change anything more for this task.

    Raised by ``ActionContext.ensure_lease`` between the steps of an action; the
    shard leaves the task 'running', to be settled by reconciliation like a task
    a crash interrupted (by us once the lease is renewed, or by the key's next owner).
    """


def _always() -> bool:
    return True


@dataclass
class ActionContext:
    """What an action may use; one per shard process."""

    store: Store
    config: Config
    libvirt: LibvirtConnections
    # Multihost: is the local copy of the lease still good? (Standalone: always.)
    lease_ok: Callable[[], bool] = _always

    def ensure_lease(self) -> None:
        """Call before each step that changes a node: stop if another instance may own the key now."""
        if not self.lease_ok():
            raise LeaseExpired("the instance's lease is too old to go on")


class Action(Protocol):
    name: str
    target_types: tuple[str, ...]

    def validate_args(self, args: dict[str, Any]) -> None:
        """Raise TaskFailed if the args do not fit this action."""

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan: ...

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome: ...

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled: ...
