"""Workloads: what tasks are queued, on which keys, how long each takes, how they arrive.

Everything here is pure and deterministic: :func:`generate` gives the same
tasks for the same workload and seed in every process and on every machine
(``random.Random`` seeded with a string is hashed with SHA-512, not with the
salted ``hash()``).

A task's *work* is its simulated action latency (``sleep``'s ``ms``; 0 for
``noop``). The makespan lower bound of a burst on P parallel workers is

    max(heaviest key's serial work, total work / P)

for runners that keep per-key order (taskomatic, and the original design with
P = 1), and max(longest single task, total work / P) for the unordered pool.

The **lifecycle** workload (``latency="lifecycle"``) is real VM work on
libvirt test nodes: each task picks a VM (uniform or Zipf) and takes the next
action that is valid from the state that VM will be in once its earlier tasks
have run (:func:`next_lifecycle_action`, the state machine of
``taskomatic/actions/states.py``). Its work is not known in advance: the
lower bound is computed from each task's measured ``time_started`` ..
``time_ended`` (:func:`measured_work_stats`).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

ZIPF_S = 1.1
HEAVY_FRACTION = 0.05
HEAVY_FACTOR = 50.0

# The lifecycle mix: from each VM state, the actions that are valid and their
# weights. A VM starts ``pending``; every action's success state is the next
# state (taskomatic/actions/states.py VM_TRANSITIONS). migrate_vm keeps it
# running (on the other node: the bench runs two). Running VMs are the ones
# with a choice: suspend/resume and migration are the common operations,
# save/restore, shutdown and poweroff the rarer ones.
LIFECYCLE_NEXT: dict[str, tuple[tuple[str, int], ...]] = {
    "pending": (("create_vm", 1),),
    "stopped": (("start_vm", 1),),
    "running": (("suspend_vm", 3), ("migrate_vm", 3), ("save_vm", 2), ("shutdown_vm", 1), ("poweroff_vm", 1)),
    "suspended": (("resume_vm", 1),),
    "saved": (("restore_vm", 1),),
}
LIFECYCLE_SUCCESS = {
    "create_vm": "stopped", "start_vm": "running", "shutdown_vm": "stopped", "poweroff_vm": "stopped",
    "suspend_vm": "suspended", "resume_vm": "running", "save_vm": "saved", "restore_vm": "running",
    "migrate_vm": "running",
}
LIFECYCLE_ACTIONS = tuple(LIFECYCLE_SUCCESS)


@dataclass(frozen=True)
class Workload:
    name: str
    tasks: int
    keys: int
    key_distribution: str = "uniform"  # uniform | zipf
    latency: str = "noop"  # noop | fixed | heavy | lifecycle (real VM actions on libvirt test nodes)
    base_ms: float = 0.0  # fixed: every task; heavy: the common case
    arrival: str = "burst"  # burst (all queued in one INSERT) | steady (at `rate` tasks/s)
    rate: float = 0.0

    def __post_init__(self) -> None:
        if self.tasks < 1 or self.keys < 1:
            raise ValueError(f"{self.name}: tasks and keys must be >= 1")
        if self.key_distribution not in ("uniform", "zipf"):
            raise ValueError(f"{self.name}: key_distribution must be uniform or zipf")
        if self.latency not in ("noop", "fixed", "heavy", "lifecycle"):
            raise ValueError(f"{self.name}: latency must be noop, fixed, heavy or lifecycle")
        if self.latency in ("fixed", "heavy") and self.base_ms <= 0:
            raise ValueError(f"{self.name}: a {self.latency} latency needs base_ms > 0")
        if self.arrival not in ("burst", "steady"):
            raise ValueError(f"{self.name}: arrival must be burst or steady")
        if self.arrival == "steady" and self.rate <= 0:
            raise ValueError(f"{self.name}: steady arrival needs rate > 0")

    @property
    def description(self) -> str:
        zipf = f"Zipf(s={ZIPF_S:.1f})"
        keys = f"{self.keys} keys {zipf if self.key_distribution == 'zipf' else 'uniform'}"
        if self.latency == "noop":
            work = "noop"
        elif self.latency == "lifecycle":
            keys = f"{self.keys} VMs {zipf if self.key_distribution == 'zipf' else 'uniform'}"
            work = "VM lifecycle mix on 2 libvirt test nodes (taskomatic only)"
        elif self.latency == "fixed":
            work = f"sleep {self.base_ms:g} ms"
        else:
            work = (f"sleep {self.base_ms:g} ms, {HEAVY_FRACTION:.0%} of tasks "
                    f"{HEAVY_FACTOR:g}x ({self.base_ms * HEAVY_FACTOR:g} ms)")
        arrival = "burst" if self.arrival == "burst" else f"steady {self.rate:g}/s"
        return f"{self.tasks} tasks, {keys}, {work}, {arrival}"

    @property
    def has_work(self) -> bool:
        """Does makespan against the lower bound mean anything (tasks take time, all at once)?"""
        return self.latency != "noop" and self.arrival == "burst"

    @property
    def needs_libvirt(self) -> bool:
        """Real VM actions: the bench starts libvirt nodes, and only the daemon can run it."""
        return self.latency == "lifecycle"

    @property
    def work_measured(self) -> bool:
        """Is the work known only after the run (measured durations), not planned?"""
        return self.latency == "lifecycle"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.description}


@dataclass(frozen=True)
class PlannedTask:
    key: int  # the VM id (ordering key)
    action: str
    ms: float  # simulated work

    @property
    def args_json(self) -> str:
        return json.dumps({"ms": self.ms}) if self.action == "sleep" else "{}"


def zipf_weights(keys: int, s: float = ZIPF_S) -> list[float]:
    """P(rank r) proportional to 1 / r**s, r = 1..keys (normalised)."""
    raw = [1.0 / (rank ** s) for rank in range(1, keys + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def next_lifecycle_action(state: str, rng: random.Random) -> str:
    """A valid next action for a VM in ``state`` (weighted by LIFECYCLE_NEXT)."""
    choices = LIFECYCLE_NEXT[state]
    if len(choices) == 1:
        return choices[0][0]
    return rng.choices([a for a, _ in choices], weights=[w for _, w in choices], k=1)[0]


def lifecycle_final_states(tasks: list[PlannedTask], vms: int) -> dict[int, str]:
    """VM id -> the state its planned tasks leave it in (every VM 1..vms; untouched ones stay pending)."""
    states = dict.fromkeys(range(1, vms + 1), "pending")
    for t in tasks:
        states[t.key] = LIFECYCLE_SUCCESS[t.action]
    return states


def generate(workload: Workload, seed: int) -> list[PlannedTask]:
    """The workload's tasks in submission order; keys are VM ids 1..keys."""
    rng = random.Random(f"taskomatic-bench:{seed}:{workload.name}")
    key_ids = list(range(1, workload.keys + 1))
    if workload.key_distribution == "zipf":
        ranked = key_ids[:]
        rng.shuffle(ranked)  # which VM is hottest is part of the seed, not always VM 1
        keys = rng.choices(ranked, weights=zipf_weights(workload.keys), k=workload.tasks)
    else:
        keys = [rng.choice(key_ids) for _ in range(workload.tasks)]
    tasks = []
    if workload.latency == "lifecycle":
        # Each VM's tasks run in id order, so the state a task finds is the one
        # its VM's previous task left: track it here and pick what is valid from it.
        state = dict.fromkeys(key_ids, "pending")
        for key in keys:
            action = next_lifecycle_action(state[key], rng)
            state[key] = LIFECYCLE_SUCCESS[action]
            tasks.append(PlannedTask(key, action, 0.0))
        return tasks
    for key in keys:
        if workload.latency == "noop":
            tasks.append(PlannedTask(key, "noop", 0.0))
        elif workload.latency == "fixed":
            tasks.append(PlannedTask(key, "sleep", workload.base_ms))
        else:
            heavy = rng.random() < HEAVY_FRACTION
            tasks.append(PlannedTask(key, "sleep", workload.base_ms * (HEAVY_FACTOR if heavy else 1.0)))
    return tasks


@dataclass(frozen=True)
class WorkStats:
    total_s: float
    heaviest_key_s: float
    heaviest_key_tasks: int
    longest_task_s: float
    distinct_keys: int


def work_stats(tasks: list[PlannedTask]) -> WorkStats:
    """The planned work (``ms``) of a workload's tasks."""
    return measured_work_stats([(t.key, t.ms / 1000.0) for t in tasks])


def measured_work_stats(work: list[tuple[Any, float]]) -> WorkStats:
    """WorkStats from (ordering key, seconds of work) pairs: planned, or measured as
    ``time_ended - time_started`` of each task that ran (a lifecycle run's work)."""
    if not work:
        raise ValueError("no tasks")
    per_key: dict[Any, float] = defaultdict(float)
    count: dict[Any, int] = defaultdict(int)
    for key, seconds in work:
        if seconds < 0:
            raise ValueError(f"negative work {seconds} for key {key!r}")
        per_key[key] += seconds
        count[key] += 1
    hottest = max(count, key=lambda k: (per_key[k], count[k]))
    return WorkStats(
        total_s=sum(seconds for _, seconds in work),
        heaviest_key_s=per_key[hottest],
        heaviest_key_tasks=max(count.values()),
        longest_task_s=max(seconds for _, seconds in work),
        distinct_keys=len(count),
    )


def lower_bound(stats: WorkStats, parallelism: int, keyed: bool = True) -> float:
    """Makespan lower bound in seconds for a burst on ``parallelism`` workers.

    keyed: per-key serial order holds, so the heaviest key's work is serial.
    Otherwise only a single task is indivisible.
    """
    if parallelism < 1:
        raise ValueError("parallelism must be >= 1")
    serial = stats.heaviest_key_s if keyed else stats.longest_task_s
    return max(serial, stats.total_s / parallelism)
