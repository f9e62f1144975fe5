"""Benchmark actions: nothing touches libvirt, so the pipeline itself is measured.

* ``noop`` (target ``Vm``, no args): finishes at once.
* ``sleep`` (target ``Vm``, args ``{"ms": float}``): simulated action latency.

Both leave the resource rows alone (the VM ids are just ordering keys; no
``vms`` row is needed). After a crash neither has any effect to find, so a
``noop`` is settled as done and a ``sleep`` as not started (run it again).
"""

from __future__ import annotations

import time
from typing import Any

from taskomatic.actions.base import Action, ActionContext, Outcome, Plan, Reconciled, Settlement, TaskFailed
from taskomatic.model import TaskRow

MAX_SLEEP_MS = 600_000.0


class Noop:
    name = "noop"
    target_types: tuple[str, ...] = ("Vm",)

    def validate_args(self, args: dict[str, Any]) -> None:
        if args:
            raise TaskFailed(f"noop: unknown argument(s) {', '.join(sorted(args))} (allowed: none)")

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        return Plan(task)

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        return Outcome.finished()

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        return Reconciled(Settlement.DONE, "noop: nothing to check")


class Sleep:
    name = "sleep"
    target_types: tuple[str, ...] = ("Vm",)

    def validate_args(self, args: dict[str, Any]) -> None:
        unknown = set(args) - {"ms"}
        if unknown:
            raise TaskFailed(f"sleep: unknown argument(s) {', '.join(sorted(unknown))} (allowed: ms)")
        ms = args.get("ms")
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 <= ms <= MAX_SLEEP_MS:
            raise TaskFailed(f"sleep: args.ms must be a number of milliseconds in [0, {MAX_SLEEP_MS:.0f}]")

    def prepare(self, ctx: ActionContext, task: TaskRow) -> Plan:
        return Plan(task, data={"seconds": float(task.args["ms"]) / 1000.0})

    def perform(self, ctx: ActionContext, plan: Plan) -> Outcome:
        time.sleep(plan.data["seconds"])
        return Outcome.finished()

    def reconcile(self, ctx: ActionContext, task: TaskRow) -> Reconciled:
        return Reconciled(Settlement.NOT_STARTED, "sleep: no effect to find; running it again")


ACTIONS: list[Action] = [Noop(), Sleep()]
