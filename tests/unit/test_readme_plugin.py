"""The README's plugin example is a working action that imports only public modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

from taskomatic.actions.base import ActionContext, Outcome, Plan, Reconciled
from taskomatic.config import Config
from taskomatic.model import OutcomeState, Settlement, TaskRow

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    section = README.read_text().split("### Writing an action (a plugin)", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python example in the plugin section"
    return match.group(1)


def test_the_example_imports_only_public_modules() -> None:
    tree = ast.parse(_example())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in modules if m.startswith("taskomatic")} == {"taskomatic.actions.base", "taskomatic.model"}


def test_the_example_runs_as_an_action() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_example(), "README.md", "exec"), namespace)
    (action,) = namespace["ACTIONS"]  # type: ignore[misc]
    ctx = ActionContext(SimpleNamespace(), Config(), SimpleNamespace())  # type: ignore[arg-type]
    task = TaskRow(7, "Vm", 3, "ping_vm", {}, "Vm", 3, "queued")
    action.validate_args({})
    plan = action.prepare(ctx, task)
    assert isinstance(plan, Plan) and plan.task is task
    outcome = action.perform(ctx, plan)
    assert isinstance(outcome, Outcome) and outcome.state == OutcomeState.FINISHED
    assert outcome.message == "pong from VM 3"
    settled = action.reconcile(ctx, task)
    assert isinstance(settled, Reconciled) and settled.kind == Settlement.NOT_STARTED
