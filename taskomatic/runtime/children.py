"""The supervisor's children: what each slot runs, when a dead one is respawned, how it is started.

A dead child is replaced in the same slot. One that dies within
CHILD_BOOT_SECONDS of its start "failed to boot": it is respawned after a
growing delay (the database may be down), and after MAX_BOOT_FAILURES such
deaths in a row the supervisor gives up (EXIT_CHILD_FAILING) so systemd
decides what next. The decisions are pure functions, tested without processes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import multiprocess
from multiprocess import forkserver  # with the module, not at the first child: loaded before any privilege drop

from taskomatic.config import Config
from taskomatic.runtime.fetcher import fetcher_main
from taskomatic.runtime.reconciler import reconciler_main
from taskomatic.runtime.shard import shard_main

log = logging.getLogger(__name__)

CHILD_BOOT_SECONDS = 5.0  # a child that dies sooner "failed to boot"
MAX_BOOT_FAILURES = 5
MAX_RESPAWN_DELAY = 30.0


@dataclass
class Child:
    role: str  # "fetcher", "shard" or "reconciler"
    slot: int
    process: Any = None
    started_at: float = 0.0
    boot_failures: int = 0
    respawn_at: float = 0.0
    # Shard only: wall-clock moment its current task must be over (0: idle); the shard sets it.
    deadline: Any = None


def note_death(child: Child, lived: float, now: float) -> None:
    """A child died after ``lived`` seconds: count a failed boot, and set when to respawn it.

    Back off only for a child that keeps dying at boot (database down, say);
    one that ran a while is respawned at once.
    """
    child.boot_failures = child.boot_failures + 1 if lived < CHILD_BOOT_SECONDS else 0
    delay = min(MAX_RESPAWN_DELAY, 0.5 * 2 ** child.boot_failures) if child.boot_failures else 0.0
    child.respawn_at = now + delay


def children_to_respawn(children: list[Child], now: float) -> tuple[list[Child], Child | None]:
    """The dead children due for a respawn, in slot order, up to the first one that keeps failing to boot.

    The second value is that child (the supervisor gives up), or None.
    """
    due: list[Child] = []
    for child in children:
        if child.process is None and now >= child.respawn_at:
            if child.boot_failures >= MAX_BOOT_FAILURES:
                return due, child
            due.append(child)
    return due, None


def child_context(start_method: str) -> Any:
    """The multiprocess context children start from: "forkserver" (preloaded) or "spawn".

    Both keep the supervisor's state out of the children: the fork server is a
    fresh interpreter started with only its socket and a pipe, so it holds none
    of the supervisor's connections, threads or locks. It imports what every
    child needs and freezes its heap (taskomatic.runtime.preload), then forks
    each child, which shares those pages. "spawn" starts each child as a fresh
    interpreter that imports everything itself.
    """
    context = multiprocess.get_context(start_method)
    if start_method == "forkserver":
        forkserver.set_forkserver_preload(["taskomatic.runtime.preload"])
    return context


def start_child(mp: Any, child: Child, config: Config, instance_id: int, socket_path: str,
                lease_until: Any) -> Any:
    """Start ``child``'s process (from ``mp``, child_context's); for the fetcher, the end of its status pipe."""
    reader = None
    if child.role == "reconciler":
        process = mp.Process(target=reconciler_main, name="taskomatic-reconciler", args=(config,))
        process.start()
    elif child.role == "fetcher":
        reader, writer = mp.Pipe(duplex=False)
        process = mp.Process(
            target=fetcher_main, name="taskomatic-fetcher",
            args=(config, instance_id, socket_path, writer, lease_until))
        process.start()
        writer.close()  # our copy; the fetcher has its own
    else:
        child.deadline = mp.Value("d", 0.0, lock=False)
        process = mp.Process(
            target=shard_main, name=f"taskomatic-shard-{child.slot}",
            args=(child.slot, config.shards, config, instance_id, socket_path,
                  child.deadline, lease_until))
        process.start()
    child.process = process
    child.started_at = time.monotonic()
    log.debug("%s %d started as pid %d", child.role, child.slot, process.pid)
    return reader
