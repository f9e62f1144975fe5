"""The operator's database access: what the command line and the demo read and change.

Each function runs one named query of ``sql/operator.sql`` on the given
Store; none commits (the caller decides, usually with ``store.transaction()``).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from taskomatic.db.store import Row, Store

TERMINAL = ("finished", "failed", "canceled")


def submit_task(store: Store, target_type: str, target_id: int, action: str, args: dict[str, Any],
                submitted_by: str) -> int:
    return int(store.scalar("submit_task", target_type=target_type, target_id=target_id, action=action,
                            args=json.dumps(args), submitted_by=submitted_by))


def list_tasks(store: Store, state: str | None, target_type: str | None, target_id: int | None,
               action: str | None, limit: int) -> list[Row]:
    return store.all("list_tasks", state=state, target_type=target_type, target_id=target_id,
                     action=action, limit=limit)


def tasks_changed_since(store: Store, last_id: int, since: dt.datetime) -> list[Row]:
    return store.all("tasks_changed_since", last_id=last_id, since=since)


def task_details(store: Store, task_id: int) -> Row | None:
    return store.one("task_details", task_id=task_id)


def task_state(store: Store, task_id: int) -> str | None:
    row = store.one("task_states", ids=[task_id])
    return None if row is None else str(row["state"])


def cancel_task(store: Store, task_id: int, message: str) -> bool:
    return store.scalar("cancel_task", task_id=task_id, message=message) is not None


def retry_task(store: Store, task_id: int) -> int | None:
    new_id = store.scalar("retry_task", task_id=task_id)
    return None if new_id is None else int(new_id)


def matching_tasks(store: Store, states: list[str], target_type: str | None, target_id: int | None,
                   action: str | None) -> list[int]:
    rows = store.all("matching_tasks", states=states, target_type=target_type, target_id=target_id,
                     action=action)
    return [int(r["id"]) for r in rows]


def cancel_tasks(store: Store, ids: list[int], message: str) -> list[int]:
    return sorted(int(r["id"]) for r in store.all("cancel_tasks", ids=ids, message=message))


def retry_tasks(store: Store, ids: list[int]) -> list[int]:
    return sorted(int(r["id"]) for r in store.all("retry_tasks", ids=ids))


def active_counts(store: Store) -> dict[str, int]:
    return {r["state"]: int(r["n"]) for r in store.all("active_counts")}


def oldest_queued(store: Store) -> Row | None:
    return store.one("oldest_queued")


def running_tasks(store: Store) -> list[Row]:
    return store.all("running_tasks")


def live_instances(store: Store) -> list[Row]:
    return store.all("live_instances")


def all_instances(store: Store, limit: int | None) -> list[Row]:
    return store.all("all_instances", limit=limit)
