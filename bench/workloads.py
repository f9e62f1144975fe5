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


@dataclass(frozen=True)
class Workload:
    name: str
    tasks: int
    keys: int
    key_distribution: str = "uniform"  # uniform | zipf
    latency: str = "noop"  # noop | fixed | heavy
    base_ms: float = 0.0  # fixed: every task; heavy: the common case
    arrival: str = "burst"  # burst (all queued in one INSERT) | steady (at `rate` tasks/s)
    rate: float = 0.0

    def __post_init__(self) -> None:
        if self.tasks < 1 or self.keys < 1:
            raise ValueError(f"{self.name}: tasks and keys must be >= 1")
        if self.key_distribution not in ("uniform", "zipf"):
            raise ValueError(f"{self.name}: key_distribution must be uniform or zipf")
        if self.latency not in ("noop", "fixed", "heavy"):
            raise ValueError(f"{self.name}: latency must be noop, fixed or heavy")
        if self.latency != "noop" and self.base_ms <= 0:
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

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.description}


@dataclass(frozen=True)
class PlannedTask:
    key: int  # the VM id (ordering key)
    action: str
    ms: float  # simulated work

    @property
    def args_json(self) -> str:
        return "{}" if self.action == "noop" else json.dumps({"ms": self.ms})


def zipf_weights(keys: int, s: float = ZIPF_S) -> list[float]:
    """P(rank r) proportional to 1 / r**s, r = 1..keys (normalised)."""
    raw = [1.0 / (rank ** s) for rank in range(1, keys + 1)]
    total = sum(raw)
    return [w / total for w in raw]


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
    per_key: dict[int, float] = defaultdict(float)
    count: dict[int, int] = defaultdict(int)
    for t in tasks:
        per_key[t.key] += t.ms / 1000.0
        count[t.key] += 1
    hottest = max(count, key=lambda k: (per_key[k], count[k]))
    return WorkStats(
        total_s=sum(t.ms for t in tasks) / 1000.0,
        heaviest_key_s=per_key[hottest],
        heaviest_key_tasks=max(count.values()),
        longest_task_s=max(t.ms for t in tasks) / 1000.0,
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
