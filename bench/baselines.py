"""The two baselines every taskomatic figure is compared with, on the same tasks table.

* ``original``: the original design. One process, a poll loop, one task at a
  time: SELECT the oldest queued task, UPDATE it running, run it, UPDATE it
  finished, each statement its own transaction (autocommit); when nothing is
  queued, sleep ``--poll`` seconds and look again.
* ``pool``: a plain ``FOR UPDATE SKIP LOCKED`` worker pool. ``--workers``
  processes, each claiming the oldest unlocked queued task and marking it
  running in one transaction, running it, and marking it finished in a second
  one. No per-key order at all (two tasks of one VM may run at once, or out of
  order). An idle worker waits on the schema's ``taskomatic_new_tasks``
  notification (at most ``--poll`` seconds), as a LISTEN-based queue would.

Both run the bench actions (``noop``, ``sleep``) directly, stop after the
current task on SIGTERM or SIGINT, and tell the bench they are ready the
systemd way: ``READY=1`` on the datagram socket named by ``NOTIFY_SOCKET``.
The selects carry ``claimed_by IS NULL`` (always true here) so that they use
the daemon's partial index ``tasks_claimable_idx``, as the daemon's claim does:
neither baseline is slowed by a missing index.

Run: ``python -m bench.baselines original --dsn DSN`` or
``python -m bench.baselines pool --dsn DSN --workers 4``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import select
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from typing import Any

import psycopg2
import psycopg2.extensions

NOTIFY_CHANNEL = "taskomatic_new_tasks"

SELECT_OLDEST = """
SELECT id, action, args FROM tasks
WHERE state = 'queued' AND claimed_by IS NULL
ORDER BY id LIMIT 1
"""
# A running task names its holder (the schema's tasks_unclaimed_running): the
# baselines register one instances row, as any program running tasks must.
REGISTER = """
INSERT INTO instances (hostname, pid, version, mode, shards)
VALUES ('bench baseline', %s, 'baseline', 'standalone', %s) RETURNING id
"""
MARK_RUNNING = """
UPDATE tasks SET state = 'running', time_started = clock_timestamp(), attempts = attempts + 1, claimed_by = %s
WHERE id = %s AND state = 'queued'
"""
# time_started/time_ended are taken in Python right around the action and
# written with the outcome, as the daemon's shards do, so every runner's
# timestamps mean the same thing.
CLAIM_SKIP_LOCKED = """
WITH picked AS (
    SELECT id FROM tasks
    WHERE state = 'queued' AND claimed_by IS NULL
    ORDER BY id LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks t SET state = 'running', time_started = clock_timestamp(), attempts = attempts + 1,
                   claimed_by = %s
FROM picked WHERE t.id = picked.id
RETURNING t.id, t.action, t.args
"""
MARK_ENDED = """
UPDATE tasks SET state = %s, message = %s, time_started = %s, time_ended = %s
WHERE id = %s AND state = 'running'
"""

_stop = False


def _request_stop(_signum: int, _frame: object) -> None:
    global _stop
    _stop = True


def _install_stop_handlers() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _request_stop)


def notify_ready() -> None:
    """``READY=1`` to $NOTIFY_SOCKET, as sd_notify does; nothing when it is unset."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", path)


def now() -> datetime:
    return datetime.now(UTC)


def perform(action: str, args: Any) -> tuple[str, str | None]:
    """Run a bench action as the plugin would; (state, message)."""
    if action == "noop":
        return "finished", None
    if action == "sleep" and isinstance(args, dict) and isinstance(args.get("ms"), int | float):
        time.sleep(float(args["ms"]) / 1000.0)
        return "finished", None
    return "failed", f"baseline: cannot run action {action!r} with args {args!r}"


def _connect(dsn: str, name: str) -> psycopg2.extensions.connection:
    return psycopg2.connect(dsn, application_name=name)


def register(dsn: str, workers: int) -> int:
    conn = _connect(dsn, "bench baseline")
    try:
        with conn.cursor() as cur:
            cur.execute(REGISTER, (os.getpid(), workers))
            instance_id = int(cur.fetchone()[0])
        conn.commit()
    finally:
        conn.close()
    return instance_id


def run_original(dsn: str, poll: float) -> int:
    """Baseline (a): one process, a poll loop, one task at a time."""
    _install_stop_handlers()
    instance_id = register(dsn, 1)
    conn = _connect(dsn, "bench baseline original")
    conn.autocommit = True  # every statement is its own transaction
    cur = conn.cursor()
    notify_ready()
    while not _stop:
        cur.execute(SELECT_OLDEST)
        row = cur.fetchone()
        if row is None:
            time.sleep(poll)
            continue
        task_id, action, args = row
        cur.execute(MARK_RUNNING, (instance_id, task_id))
        if cur.rowcount != 1:
            continue
        started = now()
        state, message = perform(action, args)
        ended = now()
        cur.execute(MARK_ENDED, (state, message, started, ended, task_id))
    conn.close()
    return 0


def _pool_worker(dsn: str, poll: float, index: int, barrier: Any, instance_id: int) -> None:
    _install_stop_handlers()
    conn = _connect(dsn, f"bench baseline pool worker {index}")
    with conn.cursor() as cur:
        cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
    conn.commit()
    barrier.wait(60)
    cur = conn.cursor()
    while not _stop:
        cur.execute(CLAIM_SKIP_LOCKED, (instance_id,))
        row = cur.fetchone()
        conn.commit()
        if row is None:
            # Idle: wait for an insert's notification (or the poll timeout).
            try:
                readable, _, _ = select.select([conn], [], [], poll)
            except InterruptedError:
                continue
            if readable:
                conn.poll()
                conn.notifies.clear()
            continue
        task_id, action, args = row
        started = now()
        state, message = perform(action, args)
        ended = now()
        cur.execute(MARK_ENDED, (state, message, started, ended, task_id))
        conn.commit()
    conn.close()


def run_pool(dsn: str, workers: int, poll: float) -> int:
    """Baseline (b): ``workers`` processes claiming with FOR UPDATE SKIP LOCKED, no per-key order."""
    # Forked workers stay in this process's group, so the bench's per-group CPU
    # accounting sees them; they reset the handlers to their own.
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(workers + 1)
    _install_stop_handlers()
    instance_id = register(dsn, workers)
    procs = [context.Process(target=_pool_worker, args=(dsn, poll, i, barrier, instance_id), name=f"pool worker {i}")
             for i in range(workers)]
    for proc in procs:
        proc.start()
    barrier.wait(60)  # a worker that cannot connect breaks it: no READY, the bench gives up
    notify_ready()
    while not _stop and all(p.is_alive() for p in procs):
        time.sleep(0.2)
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.join()
    return 0 if all(p.exitcode == 0 for p in procs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["original", "pool"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--workers", type=int, default=1, help="pool: worker processes")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between polls when idle")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.poll <= 0:
        parser.error("--workers must be >= 1 and --poll > 0")
    if args.kind == "original":
        return run_original(args.dsn, args.poll)
    return run_pool(args.dsn, args.workers, args.poll)


if __name__ == "__main__":
    sys.exit(main())
