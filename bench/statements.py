"""PostgreSQL CPU per task of the hot statements, standalone vs multihost, prepared vs plain:
``python -m bench.statements``.

What a no-op task costs the database, statement by statement, without the
daemon around it: the claim (as the fetcher makes it), the start and the
outcome (as a shard writes them, in batches), each in its own transaction,
through :class:`taskomatic.db.store.Store` exactly as the daemon calls it. Four
setups, each on a fresh migrated database with the same backlog:

* **standalone** / **multihost**: ``claim_tasks``, ``mark_running``,
  ``record_outcomes`` against ``claim_partition_tasks`` (with the fetcher's
  per-partition caps) and the fenced writes under partition leases (one
  instance holding all P partitions);
* **prepared** / **plain**: the start and outcome statements as prepared
  statements (``Store(prepare=True)``, the daemon's way) or sent as SQL text
  every time.

The figure is the CPU time of the session's backend process (``/proc``), so
the machine's other load inflates it little; the setups alternate over
``--repeats`` rounds (which goes first alternates too) and the median is
reported, with each setup's ratio to standalone prepared. Results: printed and
written as ``bench/results/<stamp>-statements/statements.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import NOOP_BACKLOG_SQL, RESULTS_DIR, Harness, create_database, drop_database

SETUPS = (("standalone", True), ("multihost", True), ("standalone", False), ("multihost", False))
KINDS = ("claim", "start", "end")


def backend_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one local process."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def label(mode: str, prepared: bool) -> str:
    return f"{mode}, {'prepared' if prepared else 'plain'}"


def run_setup(server_dsn: str, db_name: str, mode: str, prepared: bool, tasks: int, keys: int, claim: int,
              batch: int) -> dict[str, Any]:
    """One setup on a fresh database: backend CPU per 1,000 tasks for each statement kind."""
    from taskomatic import __version__
    from taskomatic.db import claims, task_writes
    from taskomatic.db import partitions as dbp
    from taskomatic.db.store import Store
    from taskomatic.runtime.partition_book import PartitionBook

    dsn = create_database(server_dsn, db_name)
    store = Store.open(dsn, "bench statements", prepare=prepared)
    try:
        with store.transaction():
            lease = 3600 if mode == "multihost" else None
            me = int(store.scalar("register_instance", hostname=socket.gethostname(), pid=os.getpid(),
                                  version=__version__, mode=mode, shards=2, lease=lease))
        book = PartitionBook(0)
        held: dict[int, int] = {}
        if mode == "multihost":
            with store.transaction():
                count = dbp.partition_count(store)
                held = {a.partition: a.token for a in dbp.acquire_partitions(store, me, range(count))}
            book = PartitionBook(count)
            for partition, token in held.items():
                book.hold(partition, token)
        with store.conn.cursor() as cur:
            cur.execute(NOOP_BACKLOG_SQL, {"rows": tasks, "keys": keys})
            store.commit()
            store.conn.autocommit = True
            cur.execute("ANALYZE tasks")
            store.conn.autocommit = False
            cur.execute("SELECT pg_backend_pid()")
            pid = int(cur.fetchone()[0])
        store.rollback()
        cpu = dict.fromkeys(KINDS, 0.0)
        statements = Counter[str]()
        wall = time.monotonic()
        while True:
            before = backend_cpu_s(pid)
            with store.transaction():
                if mode == "multihost":
                    caps = book.claim_caps(claim)
                    rows = dbp.claim_partition_tasks(store, me, held, caps, claim)
                    book.claimed(caps, Counter(r["partition"] for r in rows), claim)
                else:
                    rows = claims.claim_tasks(store, me, claim)
            cpu["claim"] += backend_cpu_s(pid) - before
            statements["claim"] += 1
            if not rows:
                break
            rows.sort(key=lambda r: r["id"])
            for first in range(0, len(rows), batch):
                part = rows[first:first + batch]
                ids = [r["id"] for r in part]
                leases = {r["partition"]: held[r["partition"]] for r in part} if mode == "multihost" else {}
                now = datetime.now(UTC)
                before = backend_cpu_s(pid)
                with store.transaction():
                    if mode == "multihost":
                        dbp.start_tasks_fenced(store, me, leases, ids, 0, now)
                    else:
                        task_writes.mark_running(store, me, ids, now, 0)
                middle = backend_cpu_s(pid)
                with store.transaction():
                    if mode == "multihost":
                        dbp.record_outcomes_fenced(store, me, leases,
                                                   [dbp.Outcome(i, "finished", None, now, now) for i in ids])
                    else:
                        task_writes.record_outcomes(store, me, ids, ["finished"] * len(ids), [None] * len(ids),
                                                    [now] * len(ids), [now] * len(ids))
                after = backend_cpu_s(pid)
                cpu["start"] += middle - before
                cpu["end"] += after - middle
                statements["start"] += 1
                statements["end"] += 1
        wall_s = time.monotonic() - wall
        with store.conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM tasks WHERE state = 'finished'")
            finished = int(cur.fetchone()[0])
        store.rollback()
    finally:
        store.close()
        drop_database(server_dsn, db_name)
    per_1k = {kind: round(cpu[kind] / tasks * 1000, 5) for kind in KINDS}
    return {"setup": label(mode, prepared), "mode": mode, "prepared": prepared, "tasks": tasks,
            "finished": finished, "statements": dict(statements), "postgres_cpu_s_per_1k": per_1k,
            "postgres_cpu_total_s_per_1k": round(sum(cpu.values()) / tasks * 1000, 5),
            "wall_s": round(wall_s, 3)}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for mode, prepared in SETUPS:
        mine = [r for r in runs if r["mode"] == mode and r["prepared"] == prepared]
        if not mine:
            continue
        out.append({
            "setup": label(mode, prepared), "mode": mode, "prepared": prepared, "runs": len(mine),
            "postgres_cpu_s_per_1k": {k: round(statistics.median(r["postgres_cpu_s_per_1k"][k] for r in mine), 5)
                                      for k in KINDS},
            "postgres_cpu_total_s_per_1k": round(statistics.median(r["postgres_cpu_total_s_per_1k"] for r in mine), 5),
            "claims": mine[0]["statements"].get("claim"),
            "wall_s": round(statistics.median(r["wall_s"] for r in mine), 3),
            "all_finished": all(r["finished"] == r["tasks"] for r in mine),
        })
    reference = next((s for s in out if s["mode"] == "standalone" and s["prepared"]), None)
    for s in out:
        ref = reference["postgres_cpu_total_s_per_1k"] if reference else None
        s["vs_standalone_prepared"] = round(s["postgres_cpu_total_s_per_1k"] / ref, 3) if ref else None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    wall = time.monotonic()
    runs: list[dict[str, Any]] = []
    with Harness("taskomatic-statements-", template=False, signals=False) as harness:
        machine = harness.machine
        for rep in range(args.repeats):
            order = SETUPS if rep % 2 == 0 else tuple(reversed(SETUPS))
            for mode, prepared in order:
                print(f"round {rep + 1}/{args.repeats}: {label(mode, prepared)} ...", file=sys.stderr, flush=True)
                runs.append(run_setup(harness.server_dsn, f"statements_{rep}_{mode}_{int(prepared)}", mode, prepared,
                                      args.tasks, args.keys, args.claim, args.batch))
    return {
        "benchmark": "statements", "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - wall, 1), "command": " ".join(sys.argv), "machine": machine,
        "settings": {"tasks": args.tasks, "keys": args.keys, "claim": args.claim, "batch": args.batch,
                     "repeats": args.repeats},
        "runs": runs, "summary": summarise(runs),
    }


def render(results: dict[str, Any]) -> str:
    st = results["settings"]
    lines = [f"PostgreSQL backend CPU per 1,000 no-op tasks ({st['tasks']:,} tasks over {st['keys']} keys; claims of "
             f"{st['claim']}, starts and outcomes in batches of {st['batch']}, one transaction each; median of "
             f"{st['repeats']} rounds)", "",
             "| setup | claim s/1k | start s/1k | outcome s/1k | total s/1k | vs standalone prepared | claims |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in results["summary"]:
        c = s["postgres_cpu_s_per_1k"]
        lines.append(f"| {s['setup']} | {c['claim']:.4f} | {c['start']:.4f} | {c['end']:.4f} "
                     f"| {s['postgres_cpu_total_s_per_1k']:.4f} | {s['vs_standalone_prepared']:.2f} | {s['claims']} |")
    by = {s["setup"]: s["postgres_cpu_total_s_per_1k"] for s in results["summary"]}
    for mode in ("standalone", "multihost"):
        plain, prepared = by.get(label(mode, False)), by.get(label(mode, True))
        if plain and prepared:
            lines.append(f"{mode}: prepared / plain = {prepared / plain:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.statements", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="no-op tasks per setup (default 20,000)")
    parser.add_argument("--keys", type=int, default=500, help="VM ids they spread over (default 500)")
    parser.add_argument("--claim", type=int, default=200, help="tasks per claim (the default claim_batch)")
    parser.add_argument("--batch", type=int, default=32, help="tasks per start and per outcome write (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the four setups (default 3)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<stamp>-statements)")
    args = parser.parse_args(argv)
    if min(args.tasks, args.keys, args.claim, args.batch, args.repeats) < 1:
        parser.error("--tasks, --keys, --claim, --batch and --repeats must be at least 1")
    out = args.out or RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-statements"
    results = run(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "statements.json").write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))
    print(f"took {results['wall_s']:.0f} s; wrote {out / 'statements.json'}")
    return 0 if all(s["all_finished"] for s in results["summary"]) else 1


if __name__ == "__main__":
    sys.exit(main())
