"""Claim throughput with N finished rows in the table vs an empty table: ``python -m bench.claims``.

Issue 5's target: claiming with 1,000,000 finished rows within 10 % of the
empty table. The daemon's claim statement (``claim_tasks`` of queries.sql,
run through :class:`taskomatic.db.store.Store` exactly as the fetcher runs it,
one commit per batch) reads only the partial index ``tasks_claimable_idx``,
so it should not care how many finished rows the table holds; this measures it.

One private PostgreSQL (EmbeddedPostgres, fsync on). Two databases, each
fresh and migrated (``taskomatic.db.migrate.upgrade``), each with a registered
instance row:

* **empty**: only the queued backlog;
* **full**: ``--finished`` finished rows first (one ``INSERT ... SELECT FROM
  generate_series``, through the table's triggers, claimed by the instance as a
  daemon would have left them), then the same queued backlog.

Both get ``ANALYZE``, then ``--batches`` claims of ``--batch`` tasks each
(after ``--warmup`` untimed ones), alternating between the two tables (which
goes first alternates too, so drift of the machine hits both alike), each
timed alone. Claimed tasks/s = tasks claimed / time of the timed claims. The
EXPLAIN (ANALYZE, BUFFERS) of one more claim, in a transaction rolled back,
shows the plan: the scan that picks the tasks (it should be the partial index)
and the join back to ``tasks`` for the UPDATE (a nested loop over the primary
key; on a small table the planner may prefer a hash join over a seq scan).
Results: printed, and written as ``bench/results/<stamp>-claims/claims.json``
(or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import NOOP_BACKLOG_SQL, RESULTS_DIR, Harness, create_database, drop_database

CLAIMABLE_INDEX = "tasks_claimable_idx"

FINISHED_SQL = """
INSERT INTO tasks (task_target_type, task_target_id, action, args, state, submitted_by,
                   created_at, time_started, time_ended, claimed_by, claimed_at, attempts)
SELECT 'Vm', (g %% %(keys)s) + 1, 'noop', '{}'::jsonb, 'finished', 'bench',
       t, t, t + interval '1 millisecond', %(instance_id)s, t, 1
FROM generate_series(1, %(rows)s) AS g,
     LATERAL (SELECT timestamptz '2026-01-01' + g * interval '10 milliseconds') AS s(t)
"""


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", []):
        found.extend(_plan_nodes(child))
    return found


def explain_claim(store: Any, instance_id: int, batch: int) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of one claim, rolled back: the plan's top node and its scan of tasks."""
    from taskomatic.db.queries import query

    with store.conn.cursor() as cur:
        sql = cur.mogrify(query("claim_tasks"), {"instance_id": instance_id, "limit": batch}).decode()
        cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql)
        plan_json = cur.fetchone()[0]
        store.conn.rollback()
        cur.execute("EXPLAIN (COSTS OFF) " + sql)
        text = "\n".join(r[0] for r in cur.fetchall())
    store.conn.rollback()
    top = plan_json[0]["Plan"]
    nodes = _plan_nodes(top)
    scans = [n for n in nodes if n.get("Relation Name") == "tasks" and "Index Name" in n
             and n.get("Parent Relationship") != "Inner"]
    claim_scan = next((n for n in scans if n.get("Index Name") == CLAIMABLE_INDEX), scans[0] if scans else None)
    seq_scans = [n for n in nodes if n.get("Node Type") == "Seq Scan" and n.get("Relation Name") == "tasks"]
    # The UPDATE's join of the picked ids back to tasks: a nested loop over the primary key is O(batch),
    # a hash join over a seq scan reads the whole table.
    joins = [n for n in top.get("Plans", []) if n.get("Parent Relationship") != "InitPlan"
             and n.get("Subplan Name") is None]
    return {
        "top_node": top["Node Type"],
        "claim_scan": None if claim_scan is None else {
            "node": claim_scan["Node Type"], "index": claim_scan.get("Index Name"),
            "actual_rows": claim_scan.get("Actual Rows"),
            "shared_buffers_hit": claim_scan.get("Shared Hit Blocks"),
            "shared_buffers_read": claim_scan.get("Shared Read Blocks"),
        },
        "uses_claimable_index": claim_scan is not None and claim_scan.get("Index Name") == CLAIMABLE_INDEX,
        "seq_scan_of_tasks": bool(seq_scans),
        "update_join": joins[0]["Node Type"] if joins else None,
        "update_join_scan": next((f"{n['Node Type']} on {n.get('Index Name') or n.get('Relation Name')}"
                                  for n in (_plan_nodes(joins[0]) if joins else [])
                                  if n.get("Relation Name") == "tasks"), None),
        "total_buffers_hit": top.get("Shared Hit Blocks"),
        "total_buffers_read": top.get("Shared Read Blocks"),
        "execution_ms": plan_json[0].get("Execution Time"),
        "text": text,
    }


def build_case(server_dsn: str, name: str, finished: int, queued: int, batch: int, keys: int) -> Any:
    """One fresh migrated database with ``finished`` finished rows and ``queued`` queued: (store, instance, figures)."""
    from taskomatic import __version__
    from taskomatic.db.store import Store

    dsn = create_database(server_dsn, name)
    store = Store.open(dsn, "bench claims")
    instance_id = int(store.scalar("register_instance", hostname=socket.gethostname(), pid=os.getpid(),
                                   version=__version__, mode="standalone", shards=1, lease=None))
    store.commit()
    result: dict[str, Any] = {"finished_rows": finished, "queued_rows": queued}
    with store.conn.cursor() as cur:
        start = time.monotonic()
        if finished:
            cur.execute(FINISHED_SQL, {"rows": finished, "keys": keys, "instance_id": instance_id})
        store.commit()
        result["insert_finished_s"] = round(time.monotonic() - start, 2)
        start = time.monotonic()
        cur.execute(NOOP_BACKLOG_SQL, {"rows": queued, "keys": keys})
        store.commit()
        result["insert_queued_s"] = round(time.monotonic() - start, 2)
        start = time.monotonic()
        store.conn.autocommit = True
        cur.execute("ANALYZE tasks")
        store.conn.autocommit = False
        result["analyze_s"] = round(time.monotonic() - start, 2)
        cur.execute("SELECT pg_total_relation_size('tasks'), pg_relation_size(%s)", (CLAIMABLE_INDEX,))
        table_bytes, index_bytes = cur.fetchone()
        store.commit()
    result["table_mb"] = round(table_bytes / 2**20, 1)
    result["claimable_index_kb"] = round(index_bytes / 2**10, 1)
    result["explain"] = explain_claim(store, instance_id, batch)
    return store, instance_id, result


def claim_once(store: Any, instance_id: int, batch: int) -> tuple[float, int]:
    """One claim as the fetcher makes it (its own transaction): (seconds, tasks claimed)."""
    start = time.perf_counter()
    rows = store.all("claim_tasks", instance_id=instance_id, limit=batch)
    store.commit()
    return time.perf_counter() - start, len(rows)


def finish_case(result: dict[str, Any], times: list[float], claimed: int, batch: int, warmup: int) -> None:
    total = sum(times)
    ordered = sorted(times)
    result.update({
        "batches": len(times), "batch": batch, "warmup_batches": warmup, "claimed": claimed,
        "claim_s": round(total, 4),
        "claimed_per_s": round(claimed / total, 1) if total > 0 else None,
        "batch_ms": {"min": round(ordered[0] * 1000, 3), "p50": round(ordered[len(ordered) // 2] * 1000, 3),
                     "max": round(ordered[-1] * 1000, 3)},
    })


def run(args: argparse.Namespace) -> dict[str, Any]:
    needed = (args.warmup + args.batches) * args.batch + args.batch  # + the rolled-back EXPLAIN claim
    queued = max(args.queued, needed)
    wall = time.monotonic()
    with Harness("taskomatic-claims-", template=False, signals=False) as harness:
        machine = harness.machine
        cases: dict[str, dict[str, Any]] = {}
        stores: dict[str, tuple[Any, int]] = {}
        try:
            for label, finished in (("empty", 0), ("full", args.finished)):
                print(f"{label}: {finished:,} finished + {queued:,} queued rows ...", file=sys.stderr, flush=True)
                store, instance_id, cases[label] = build_case(harness.server_dsn, f"claims_{label}", finished,
                                                              queued, args.batch, args.keys)
                stores[label] = (store, instance_id)
            print(f"claiming: {args.batches} batches of {args.batch} from each, alternating ...", file=sys.stderr,
                  flush=True)
            times: dict[str, list[float]] = {label: [] for label in stores}
            claimed = dict.fromkeys(stores, 0)
            for round_no in range(args.warmup + args.batches):
                # Alternate which table goes first, so neither gains from the machine's drift.
                for label in (("empty", "full") if round_no % 2 == 0 else ("full", "empty")):
                    store, instance_id = stores[label]
                    seconds, rows = claim_once(store, instance_id, args.batch)
                    if round_no >= args.warmup:
                        times[label].append(seconds)
                        claimed[label] += rows
            for label in stores:
                finish_case(cases[label], times[label], claimed[label], args.batch, args.warmup)
        finally:
            for label, (store, _) in stores.items():
                store.close()
                drop_database(harness.server_dsn, f"claims_{label}")
    empty, full = cases["empty"]["claimed_per_s"], cases["full"]["claimed_per_s"]
    ratio = round(full / empty, 4) if empty and full else None
    return {
        "benchmark": "claims",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - wall, 1),
        "command": " ".join(sys.argv),
        "machine": machine,
        "settings": {"finished": args.finished, "queued": queued, "batches": args.batches, "batch": args.batch,
                     "warmup": args.warmup, "keys": args.keys},
        "empty": cases["empty"],
        "full": cases["full"],
        "ratio_full_to_empty": ratio,
        "target": "full within 10 % of empty (ratio >= 0.90)",
        "target_met": ratio is not None and ratio >= 0.90,
        "uses_claimable_index": cases["empty"]["explain"]["uses_claimable_index"]
        and cases["full"]["explain"]["uses_claimable_index"],
    }


def summary(results: dict[str, Any]) -> str:
    lines = [f"claim_tasks, batches of {results['settings']['batch']}, one commit each "
             f"({results['settings']['batches']} timed batches, {results['settings']['queued']:,} queued):"]
    for label in ("empty", "full"):
        case = results[label]
        scan = case["explain"]["claim_scan"] or {}
        lines.append(
            f"  {label:<5} {case['finished_rows']:>9,} finished rows ({case['table_mb']:>7.1f} MB): "
            f"{case['claimed_per_s']:>9,.0f} claimed/s, batch p50 {case['batch_ms']['p50']:.2f} ms; "
            f"plan {case['explain']['top_node']} <- {scan.get('node')} on {scan.get('index')} "
            f"({case['explain']['total_buffers_hit']} buffers hit); update join {case['explain']['update_join']} "
            f"over {case['explain']['update_join_scan']}"
            + (f"; inserting the finished rows took {case['insert_finished_s']:.1f} s" if case["finished_rows"]
               else ""))
    ratio = results["ratio_full_to_empty"]
    lines.append(f"  full / empty = {ratio:.3f} ({'meets' if results['target_met'] else 'misses'} "
                 f"the target: within 10 %)" if ratio is not None else "  ratio: n/a")
    lines.append("  plan of the claim (full):")
    lines.extend("    " + line for line in results["full"]["explain"]["text"].splitlines())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.claims", description=__doc__.split("\n")[0])
    parser.add_argument("--finished", type=int, default=1_000_000, help="finished rows in the full table")
    parser.add_argument("--queued", type=int, default=20_000, help="queued backlog in both tables (default 20,000)")
    parser.add_argument("--batches", type=int, default=50, help="timed claims per table (default 50)")
    parser.add_argument("--batch", type=int, default=200, help="tasks per claim (LIMIT; default 200)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed claims first (default 2)")
    parser.add_argument("--keys", type=int, default=500, help="distinct VM ids the rows spread over (default 500)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<stamp>-claims)")
    args = parser.parse_args(argv)
    if args.finished < 0 or args.batches < 1 or args.batch < 1 or args.keys < 1 or args.warmup < 0:
        parser.error("--finished >= 0, --batches, --batch and --keys >= 1, --warmup >= 0")
    out = args.out or RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-claims"
    results = run(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.json").write_text(json.dumps(results, indent=1) + "\n")
    print(summary(results))
    print(f"took {results['wall_s']:.0f} s; wrote {out / 'claims.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
