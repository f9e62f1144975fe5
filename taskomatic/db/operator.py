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


# -- the demo ---------------------------------------------------------------------------------------------


def demo_queue_vm_tasks(store: Store, tasks: list[tuple[int, str]]) -> None:
    store.run("demo_queue_vm_tasks", vm_ids=[vm for vm, _ in tasks], actions=[action for _, action in tasks])


def demo_add_host(store: Store, hostname: str, libvirt_uri: str, num_cpus: int, memory_kb: int) -> None:
    store.run("demo_add_host", hostname=hostname, libvirt_uri=libvirt_uri, num_cpus=num_cpus, memory_kb=memory_kb)


def demo_add_vms(store: Store, vms: list[tuple[str, int, int]]) -> list[int]:
    """(description, vcpus, memory KB) each; their ids in the same order."""
    rows = store.all("demo_add_vms", descriptions=[v[0] for v in vms], vcpus=[v[1] for v in vms],
                     memory=[v[2] for v in vms])
    return sorted(int(r["id"]) for r in rows)


def ended_task_count(store: Store) -> int:
    return int(store.scalar("ended_task_count") or 0)


def vms_and_their_nodes(store: Store) -> list[Row]:
    return store.all("vms_and_their_nodes")


def task_state_counts(store: Store) -> dict[str, int]:
    return {r["state"]: int(r["n"]) for r in store.all("task_state_counts")}


def task_time_span(store: Store) -> Row | None:
    return store.one("task_time_span")


def ended_task_timings(store: Store) -> list[Row]:
    return store.all("ended_task_timings")


def failure_kinds(store: Store) -> list[Row]:
    return store.all("failure_kinds")


def order_violations(store: Store) -> Row | None:
    return store.one("order_violations")


def vm_states(store: Store) -> dict[int, str]:
    return {int(r["id"]): r["state"] for r in store.all("vm_states")}


def tasks_by_id(store: Store, ids: list[int]) -> list[Row]:
    return store.all("tasks_by_id", ids=ids)


def demo_add_pool(store: Store, name: str, target_path: str) -> int:
    return int(store.scalar("demo_add_pool", name=name, target_path=target_path))


def demo_add_volume(store: Store, pool_id: int, name: str, size_kb: int) -> int:
    return int(store.scalar("demo_add_volume", pool_id=pool_id, name=name, size=size_kb))


def pool_state(store: Store, pool_id: int) -> str | None:
    value = store.scalar("pool_state", pool_id=pool_id)
    return None if value is None else str(value)


def pool_volume_list(store: Store, pool_id: int) -> list[Row]:
    return store.all("pool_volume_list", pool_id=pool_id)


def first_host(store: Store) -> Row | None:
    return store.one("first_host")


def disable_host(store: Store, host_id: int) -> None:
    store.run("disable_host", host_id=host_id)


def vm_count_on_host(store: Store, host_id: int) -> int:
    return int(store.scalar("vm_count_on_host", host_id=host_id) or 0)
