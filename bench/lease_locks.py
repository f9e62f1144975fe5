"""Deadlocks between the statements that lock partition lease rows: ``python -m bench.lease_locks``.

A stress, not a throughput figure: sessions run the multihost statements
that lock lease rows against each other for ``--seconds`` and count the
deadlocks PostgreSQL breaks (each one stops whoever waits on those rows for
``deadlock_timeout``, 1 s by default). One private PostgreSQL, one fresh
migrated database: instance A holds every partition, instance B is a live
joiner, and the lease rows' physical order is shuffled first (a fleet's
updates leave it so). Then, at once:

* three "shards" of A write outcomes under the leases of 30 random
  partitions each (``record_outcomes_fenced``: FOR SHARE of those rows);
* the "joiner" B reserves 85 random partitions (``request_partitions``);
* the "holder" A begins handing 40 random partitions over (``begin_release``),
  takes them back, and claims (``claim_partition_tasks``: FOR SHARE of all).

Every statement locking the rows in partition order makes a deadlock
impossible between them (docs/partitions.md, "Lock order"); before that,
this found 9-18 in 12 s. Printed, and written as
``bench/results/<stamp>-lease-locks/lease_locks.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2.errors

from bench.harness import RESULTS_DIR, Harness, create_database, drop_database


def _shuffle(store: Any, partitions: int, rng: random.Random) -> None:
    for _ in range(3):
        with store.transaction(), store.conn.cursor() as cur:
            for partition in rng.sample(range(partitions), partitions):
                cur.execute("UPDATE partition_leases SET acquired_at = acquired_at WHERE partition = %s",
                            (partition,))


def stress(dsn: str, seconds: float, seed: int) -> dict[str, Any]:
    from taskomatic.db import partitions as dbp
    from taskomatic.db.store import Store

    setup = Store.open(dsn, "bench lease_locks")
    with setup.transaction():
        a = int(setup.scalar("register_instance", hostname="a", pid=1, version="bench", mode="multihost", shards=3,
                             lease=3600))
        b = int(setup.scalar("register_instance", hostname="b", pid=2, version="bench", mode="multihost", shards=3,
                             lease=3600))
    count = dbp.partition_count(setup)
    with setup.transaction():
        held = {x.partition: x.token for x in dbp.acquire_partitions(setup, a, range(count))}
    _shuffle(setup, count, random.Random(seed))
    task_of: dict[int, int] = {}  # partition -> a running task of A there (the shards' outcomes name them)
    with setup.transaction(), setup.conn.cursor() as cur:
        cur.execute("INSERT INTO tasks (task_target_type, task_target_id, action, state, claimed_by) "
                    "SELECT 'Vm', g, 'noop', 'running', %s FROM generate_series(1, 20 * %s) g "
                    "RETURNING id, partition", (a, count))
        for task_id, partition in cur.fetchall():
            task_of.setdefault(partition, task_id)
    setup.close()
    stop = threading.Event()
    deadlocks: Counter[str] = Counter()
    done: Counter[str] = Counter()
    errors: list[str] = []

    def session(role: str, step: Callable[[Any, random.Random], None], rng_seed: int) -> None:
        store = Store.open(dsn, f"bench lease_locks {role}")
        rng = random.Random(rng_seed)
        try:
            while not stop.is_set():
                try:
                    step(store, rng)
                    done[role] += 1
                except psycopg2.errors.DeadlockDetected:
                    store.rollback()
                    deadlocks[role] += 1
        except Exception as exc:  # reported in the results: the stress itself broke
            errors.append(f"{role}: {exc}")
        finally:
            store.close()

    def shard(store: Any, rng: random.Random) -> None:
        chosen = sorted(p for p in rng.sample(range(count), 30) if p in task_of)
        try:  # written and rolled back: the tasks stay running for the next write, the locks were taken
            dbp.record_outcomes_fenced(store, a, {p: held[p] for p in chosen},
                                       [dbp.Outcome(task_of[p], "finished", None, None, datetime.now(UTC))
                                        for p in chosen])
        finally:
            store.rollback()

    def joiner(store: Any, rng: random.Random) -> None:
        with store.transaction():
            dbp.request_partitions(store, b, sorted(rng.sample(range(count), 85)))

    def holder(store: Any, rng: random.Random) -> None:
        chosen = sorted(rng.sample(range(count), 40))
        with store.transaction():
            dbp.begin_release(store, a, {p: held[p] for p in chosen})
        with store.transaction():  # take them back (ordered, as the product's statements lock)
            _take_back(store, chosen)
        with store.transaction():
            dbp.claim_partition_tasks(store, a, held, 2, 200)

    roles: list[tuple[str, Callable[[Any, random.Random], None]]] = [
        ("shard 1", shard), ("shard 2", shard), ("shard 3", shard), ("joiner", joiner), ("holder", holder)]
    threads = [threading.Thread(target=session, args=(role, step, seed + i), daemon=True)
               for i, (role, step) in enumerate(roles)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(30)
    return {"seconds": seconds, "deadlocks": sum(deadlocks.values()), "deadlocks_by_role": dict(deadlocks),
            "statements_by_role": dict(done), "errors": errors}


def _take_back(store: Any, partitions: list[int]) -> None:
    with store.conn.cursor() as cur:
        cur.execute("SELECT 1 FROM partition_leases WHERE partition = ANY(%s::smallint[]) ORDER BY partition "
                    "FOR NO KEY UPDATE", (partitions,))
        cur.execute("UPDATE partition_leases SET releasing = false WHERE partition = ANY(%s::smallint[])",
                    (partitions,))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lease_locks", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="how long the sessions run (default 12)")
    parser.add_argument("--seed", type=int, default=1, help="random choices of the sessions (default 1)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<stamp>-lease-locks)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with Harness("taskomatic-lease-locks-", template=False, signals=False) as harness:
        dsn = create_database(harness.server_dsn, "lease_locks")
        try:
            figures = stress(dsn, args.seconds, args.seed)
        finally:
            drop_database(harness.server_dsn, "lease_locks")
        machine = harness.machine
    results = {"benchmark": "lease_locks", "started_at": started, "command": " ".join(sys.argv), "machine": machine,
               **figures}
    out = args.out or RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-lease-locks"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lease_locks.json").write_text(json.dumps(results, indent=1) + "\n")
    per_role = ", ".join(f"{role} {n}" for role, n in sorted(figures["statements_by_role"].items()))
    print(f"{figures['deadlocks']} deadlocks in {args.seconds:g} s {figures['deadlocks_by_role'] or ''}; "
          f"transactions: {per_role}")
    for error in figures["errors"]:
        print(f"error: {error}")
    print(f"wrote {out / 'lease_locks.json'}")
    return 1 if figures["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
