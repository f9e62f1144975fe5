"""Fault injection: a real VM workload on real PostgreSQL and real libvirt nodes, one fault
per test, injected at a moment drawn from the seed; then tests/faults/checker.py judges.

Faults: kill -9 of a shard, of the fetcher, of the whole instance (restarted as
systemd would); SIGSTOP of a whole multihost instance past its lease; a
PostgreSQL restart; the database unreachable past the lease (multihost); a
libvirt node killed and restarted; a node that hangs (its libvirtd frozen); a
node that answers with errors (a proxy that resets every connection).

Each test ends with new work queued after the fault (it must finish: the daemon
is alive and works) and the checker's verdict (empty: the contract held).
Seeds: TASKOMATIC_FAULT_SEEDS (see README.md here); the seed is in the test id.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any

import pytest

from tests.acceptance import checks
from tests.dbproxy import PgProxy
from tests.faults.harness import LEASE_SECONDS, FaultRun
from tests.faults.nodeproxy import NodeProxy
from tests.helpers import query, wait_for

# Slow (not in the inner loop): the fault-injection suite.
pytestmark = pytest.mark.slow

SHARDS = 3
PAUSE_REFILLS = 5  # instance_paused: work queued again when it all ended before the victim was caught mid-task
# Every test takes its database fixture before make_run: fixtures are torn down in reverse,
# so the daemons stop before their database is dropped (or its server stopped).
TRANSIENT = ("retrying in", "gave up after", "stuck on a task past task_timeout")


def verdict(violations: list[str]) -> None:
    assert not violations, f"{len(violations)} violations:\n" + "\n".join(violations[:30])


# -- 1. kill -9 of a shard -------------------------------------------------------------------------
def test_shard_killed(seed: int, dsn: str, make_run: Any) -> None:
    run: FaultRun = make_run("shard_kill", seed, dsn)
    run.add_hosts()
    daemon = run.start_daemon(shards=SHARDS)
    scripts = run.workload()
    run.wait_ended(run.moment)
    slot, old_pid, task = checks.kill_shard_mid_task(daemon, dsn, SHARDS, prefer=run.rng.randrange(SHARDS))
    run.notes["killed_task"] = task["id"]
    checks.wait_slot_respawned(daemon, slot, old_pid)
    violations = run.finish(scripts, must_finish=True)
    row = query(dsn, "SELECT id, state, attempts, message FROM tasks WHERE id = %s", (task["id"],))[0]
    if not any(line for line in daemon.log().splitlines() if f"task {task['id']} (" in line and "reconciled" in line):
        violations.append(f"the task the killed shard was running was not reconciled: {row}")
    verdict(violations)


# -- 2. kill -9 of the fetcher ---------------------------------------------------------------------
def test_fetcher_killed(seed: int, dsn: str, make_run: Any) -> None:
    run: FaultRun = make_run("fetcher_kill", seed, dsn)
    run.add_hosts()
    daemon = run.start_daemon(shards=SHARDS)
    scripts = run.workload()
    run.wait_ended(run.moment)
    old = daemon.child_pids()["fetcher"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: daemon.child_pids().get("fetcher") not in (None, old), 30, 0.05, "a new fetcher")
    verdict(run.finish(scripts, must_finish=True))


# -- 3. kill -9 of the whole instance, restarted as systemd would ------------------------------------
def test_instance_killed(seed: int, dsn: str, make_run: Any) -> None:
    run: FaultRun = make_run("instance_kill", seed, dsn)
    run.add_hosts()
    daemon = run.start_daemon(shards=SHARDS)
    scripts = run.workload()
    run.wait_ended(run.moment)
    os.killpg(daemon.pid, signal.SIGKILL)
    daemon.wait(30)
    checks.assert_daemon_gone(daemon)
    left = checks.open_tasks(dsn)
    run.notes["open_at_kill"] = left
    again = run.restart_like_systemd(daemon, shards=SHARDS)
    violations = run.finish(scripts, must_finish=True)
    if left and "took over" not in again.log():
        violations.append("the restarted instance did not take over what the killed one held")
    verdict(violations)


# -- 4. SIGSTOP of a whole multihost instance, past its lease -------------------------------------------
def test_instance_paused(seed: int, dsn: str, make_run: Any) -> None:
    run: FaultRun = make_run("instance_pause", seed, dsn)
    run.add_hosts()
    count = run.rng.choice([2, 3])
    daemons = [run.start_daemon(shards=2, multihost=True, wait=False) for _ in range(count)]
    for d in daemons:
        d.wait_ready(90)
    scripts = run.workload()
    run.wait_ended(run.moment)
    victim = daemons[run.rng.randrange(count)]
    lost = run.instance_ids(victim)[-1]
    refills = 0

    def freeze_mid_task() -> bool:
        nonlocal refills
        if not checks.open_tasks(dsn):
            # Every task ended before the victim was caught running one (it holds a half or a third of
            # the partitions, and a test-driver action takes a few ms): more work, new VMs each time.
            if refills == PAUSE_REFILLS:
                raise AssertionError(f"inconclusive: the work ended {refills + 1} times before the victim was "
                                     "seen running a task")
            refills += 1
            scripts.update(checks.vm_workload(dsn, f"{run.prefix}-again{refills}", vms=12, per_vm=6,
                                              seed=f"{run.fault}:{run.seed}:again{refills}"))
            return False
        if not query(dsn, "SELECT 1 FROM tasks WHERE state = 'running' AND claimed_by = %s", (lost,)):
            return False
        run.freeze(victim)
        if query(dsn, "SELECT 1 FROM tasks WHERE state = 'running' AND claimed_by = %s", (lost,)):
            return True
        run.thaw(victim)
        return False

    wait_for(freeze_mid_task, 60, 0.005, "the victim to be running a task")
    frozen_at = query(dsn, "SELECT clock_timestamp() AS t")[0]["t"]
    # Paused past its lease, and until the others ended a few more tasks (or everything).
    more = run.rng.randint(5, 40)
    base = run.ended()
    wait_for(lambda: query(dsn, "SELECT lease_expires_at < clock_timestamp() AS x FROM instances WHERE id = %s",
                           (lost,))[0]["x"], 30, 0.05, "the paused instance's lease to run out")
    wait_for(lambda: run.ended() >= base + more or not checks.open_tasks(dsn), 60, 0.05,
             "the other instances to go on")
    # And until they took over every partition it held. Its lease is gone by the committed row, but a
    # renewal it sent just before the pause may be executed and not yet committed: thawed before any
    # takeover, that commit makes the lease live again, rightly (no one took anything over), and the
    # instance goes on. Once its partitions moved, no write of it can pass the tokens.
    wait_for(lambda: not query(dsn, "SELECT 1 FROM partition_leases WHERE instance_id = %s", (lost,)), 30, 0.05,
             "the others to take over the paused instance's partitions")
    ended_before = {r["id"] for r in query(dsn, "SELECT id FROM tasks WHERE claimed_by = %s AND state IN "
                                                "('finished', 'failed')", (lost,))}
    run.thaw(victim)
    run.notes.update(instances=count, paused_for_tasks=more, refills=refills)
    violations = run.finish(scripts, must_finish=True)
    late = query(dsn, "SELECT id, action, key_id, time_ended FROM tasks WHERE claimed_by = %s AND "
                      "state IN ('finished', 'failed') AND NOT (id = ANY(%s)) AND time_ended > %s",
                 (lost, list(ended_before), frozen_at))
    violations += [f"fencing: the paused instance recorded an outcome after its lease ran out: {r}" for r in late]
    verdict(violations)


# -- 5. PostgreSQL restarted mid-run ------------------------------------------------------------------
def test_database_restarted(seed: int, restartable_dsn: tuple[Any, str], make_run: Any) -> None:
    # restartable_dsn first: torn down last, after the daemons stopped.
    server, db = restartable_dsn
    run: FaultRun = make_run("pg_restart", seed, db)
    run.add_hosts()
    run.start_daemon(shards=SHARDS)
    scripts = run.workload()
    run.wait_ended(run.moment)
    server.restart()
    violations = run.finish(scripts, must_finish=True)
    violations += reconciler_tracebacks(run)
    verdict(violations)


def reconciler_tracebacks(run: FaultRun) -> list[str]:
    """The host-status process exits on a lost database like the shards do: one line, no traceback."""
    return [f"the reconciler died with a traceback (daemon {d.pid}, its log has the details)"
            for d in run.daemons if _RECONCILER_TRACEBACK.search(d.log())]


_RECONCILER_TRACEBACK = re.compile(r'taskomatic/runtime/reconciler\.py", line \d+, in reconciler_main')


# -- 6. the database unreachable for longer than a lease (multihost) ------------------------------------
def test_database_unreachable(seed: int, dsn: str, make_run: Any) -> None:
    run: FaultRun = make_run("db_cut", seed, dsn)
    run.add_hosts()
    proxy = PgProxy(dsn)
    run.closers.append(proxy.close)
    count = run.rng.choice([2, 3])
    cut_all = run.rng.random() < 0.5
    # Either every instance loses the database, or one does while the others carry on.
    via = [proxy.dsn if cut_all or i == 0 else dsn for i in range(count)]
    daemons = [run.start_daemon(shards=2, multihost=True, db=via[i], wait=False) for i in range(count)]
    for d in daemons:
        d.wait_ready(90)
    scripts = run.workload()
    run.wait_ended(run.moment)
    cut_off = [d for i, d in enumerate(daemons) if via[i] == proxy.dsn]
    ids = [run.instance_ids(d)[-1] for d in cut_off]
    offsets = run.log_from()
    ended_before = {r["id"] for r in query(dsn, "SELECT id FROM tasks WHERE claimed_by = ANY(%s) AND state IN "
                                                "('finished', 'failed')", (ids,))}
    proxy.cut()
    cut_at = query(dsn, "SELECT clock_timestamp() AS t")[0]["t"]
    extra = round(run.rng.uniform(0.0, 2.0), 2)
    wait_for(lambda: query(dsn, "SELECT bool_and(lease_expires_at + make_interval(secs => %s) < clock_timestamp()) "
                                "AS x FROM instances WHERE id = ANY(%s)", (extra, ids))[0]["x"],
             LEASE_SECONDS + 30, 0.05, "the cut-off instances' leases to run out")
    proxy.restore()
    run.notes.update(instances=count, cut_all=cut_all, past_lease_seconds=extra)
    # Back: each cut-off instance finds its lease lost and rejoins under a new id (its children
    # may be in their boot backoff, having died at every start while the database was away).
    wait_for(lambda: run.assert_alive(daemons) or run.logged_since(offsets, "rejoined as instance") >= len(cut_off),
             60, 0.1, "the cut-off instances to rejoin")
    violations = run.finish(scripts, must_finish=True)
    late = query(dsn, "SELECT id, action, key_id, claimed_by, time_ended FROM tasks WHERE claimed_by = ANY(%s) "
                      "AND state IN ('finished', 'failed') AND NOT (id = ANY(%s)) AND time_ended > %s",
                 (ids, list(ended_before), cut_at))
    violations += [f"fencing: a cut-off instance recorded an outcome under its lost id: {r}" for r in late]
    violations += reconciler_tracebacks(run)
    if run.logged_since(offsets, "rejoined as instance") < len(cut_off):
        violations.append("a cut-off instance did not rejoin under a new id")
    verdict(violations)


def start_some(run: FaultRun, extra: list[str] | None = None) -> list[Any]:
    """Node faults run against one standalone instance or two multihost ones (the seed decides)."""
    if run.rng.random() < 0.5:
        run.notes["mode"] = "standalone"
        return [run.start_daemon(shards=SHARDS, extra=extra)]
    run.notes["mode"] = "multihost"
    daemons = [run.start_daemon(shards=2, multihost=True, extra=extra, wait=False) for _ in range(2)]
    for d in daemons:
        d.wait_ready(90)
    return daemons


# -- 7. a libvirt node killed (kill -9) and restarted ---------------------------------------------------
def test_node_killed(seed: int, dsn: str, make_run: Any) -> None:
    run: FaultRun = make_run("node_kill", seed, dsn)
    hosts = run.add_hosts()
    start_some(run)
    scripts = run.workload()
    run.wait_ended(run.moment)
    victim = run.rng.randrange(len(run.nodes))
    offsets = run.log_from()
    run.nodes[victim].kill()
    # Down until the daemon noticed: a transient failure, or the host-status pass marking it.
    wait_for(lambda: run.logged_since(offsets, *TRANSIENT) or
             query(dsn, "SELECT 1 FROM hosts WHERE id = %s AND state = 'unavailable'", (hosts[victim],)),
             30, 0.05, "the daemon to notice the dead node")
    run.nodes[victim].start()
    run.notes["node"] = victim
    verdict(run.finish(scripts, must_finish=False))


# -- 8. a libvirt call that hangs (the node's libvirtd frozen) ----------------------------------------------
def test_node_hangs(seed: int, dsn: str, make_run: Any) -> None:
    run: FaultRun = make_run("node_hang", seed, dsn)
    run.add_hosts()
    daemons = start_some(run)
    scripts = run.workload()
    run.wait_ended(run.moment)
    victim = run.rng.randrange(len(run.nodes))
    signs = run.rng.randint(1, 4)
    offsets = run.log_from()
    base = run.ended()
    run.nodes[victim].freeze()
    # Frozen until the daemon has seen `signs` transient failures (keepalive) or killed a stuck
    # shard (task_timeout); meanwhile the other node's work must go on.
    wait_for(lambda: run.logged_since(offsets, *TRANSIENT) >= signs or not checks.open_tasks(dsn), 60, 0.05,
             "the daemon to notice the hung node")
    progressed = wait_for(lambda: run.ended() > base or not checks.open_tasks(dsn), 30, 0.05,
                          "tasks to end while a node hangs")
    run.nodes[victim].thaw()
    run.notes.update(node=victim, signs=signs, stuck_kills=run.logged_since(offsets, "past task_timeout"))
    violations = run.finish(scripts, must_finish=False)
    assert progressed
    run.assert_alive(daemons)
    verdict(violations)


# -- 9. a node that answers errors (a proxy that resets every connection) -------------------------------------
def test_node_errors(seed: int, dsn: str, make_run: Any) -> None:
    run: FaultRun = make_run("node_errors", seed, dsn)
    proxies = [NodeProxy(node.socket_path, run.base / f"proxy{i}.sock") for i, node in enumerate(run.nodes)]
    for p in proxies:
        run.closers.append(p.close)
    hosts = run.add_hosts([p.uri() for p in proxies])
    start_some(run, extra=["--set", "daemon.retry_limit=4"])
    scripts = run.workload()
    run.wait_ended(run.moment)
    victim = run.rng.randrange(len(run.nodes))
    errors = run.rng.randint(1, 16)
    give_up = run.rng.random() < 0.35
    offsets = run.log_from()
    proxies[victim].break_()
    if give_up:
        # Broken until a task used up its retries (retry_limit 4) and failed.
        wait_for(lambda: run.logged_since(offsets, "gave up after") or not checks.open_tasks(dsn), 60, 0.05,
                 "a task to give up on the broken node")
    else:
        # Broken until the daemon logged `errors` transient failures, or the host-status pass
        # marked the host down.
        wait_for(lambda: run.logged_since(offsets, *TRANSIENT) >= errors or not checks.open_tasks(dsn)
                 or (errors > 8 and query(dsn, "SELECT 1 FROM hosts WHERE id = %s AND state = 'unavailable'",
                                          (hosts[victim],))),
                 60, 0.05, "the daemon to see the node's errors")
    run.notes["give_up"] = give_up
    proxies[victim].repair()
    run.notes.update(node=victim, errors=errors, refused=proxies[victim].refused,
                     severed=proxies[victim].severed)
    verdict(run.finish(scripts, must_finish=False))
