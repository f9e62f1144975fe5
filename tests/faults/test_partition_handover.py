"""Partition hand-overs under load (issue 19): an instance joining, one leaving gracefully, and one
frozen in the middle of a hand-over; the same workload and checker as every other fault.

- ``instance_joined``: 1-2 multihost instances run the workload; at the moment, another instance
  starts. It must get partitions (the balancing gives it its share) and the run keeps the contract.
- ``instance_left``: 2-3 instances; at the moment, one gets SIGTERM (a graceful leave: it settles
  what it runs, hands its partitions back, exits 0). Nothing it ran may run twice.
- ``frozen_mid_handover``: 2 instances; the shard of one of them is stopped (SIGSTOP) while it runs a
  task of a partition the balancing will move to a joiner, so that partition stays mid-hand-over
  (``releasing``) once a third instance joins; then the whole giver is frozen, past its lease, until
  the others ended more tasks and took the partition over; then thawed. It must not write after
  losing its partitions (fencing), and its interrupted task is reconciled by the taker.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from taskomatic.partitions import assignment
from tests.acceptance import checks
from tests.faults.harness import FaultRun
from tests.helpers import query, wait_for

pytestmark = pytest.mark.slow

SHARDS = 2


def verdict(violations: list[str]) -> None:
    assert not violations, f"{len(violations)} violations:\n" + "\n".join(violations[:30])


def held_by(dsn: str, instance_ids: list[int]) -> int:
    return int(query(dsn, "SELECT count(*) AS n FROM partition_leases WHERE instance_id = ANY(%s)",
                     (instance_ids,))[0]["n"])


def start_instances(run: FaultRun, count: int) -> list[Any]:
    daemons = [run.start_daemon(shards=SHARDS, multihost=True, wait=False) for _ in range(count)]
    for d in daemons:
        d.wait_ready(90)
    return daemons


def test_instance_joined(seed: int, dsn: str, make_run: Any) -> None:
    run: FaultRun = make_run("instance_join", seed, dsn)
    run.add_hosts()
    count = run.rng.choice([1, 2])
    start_instances(run, count)
    scripts = run.workload()
    assert run.moment is not None  # workload() draws it
    run.wait_ended(run.moment)
    joiner = run.start_daemon(shards=SHARDS, multihost=True)
    ids = run.instance_ids(joiner)
    run.notes.update(instances_before=count, open_at_join=checks.open_tasks(dsn))
    partitions = int(query(dsn, "SELECT partitions AS p FROM cluster_settings")[0]["p"])
    share = partitions // (count + 1)
    # Balanced: the joiner holds its share (floor(P/n)), taken from live holders by hand-over.
    wait_for(lambda: held_by(dsn, ids) >= share, 60, 0.05, "the joining instance to hold its share")
    violations = run.finish(scripts, must_finish=True)
    verdict(violations)


def test_instance_left(seed: int, dsn: str, make_run: Any) -> None:
    run: FaultRun = make_run("instance_leave", seed, dsn)
    run.add_hosts()
    count = run.rng.choice([2, 3])
    daemons = start_instances(run, count)
    scripts = run.workload()
    assert run.moment is not None  # workload() draws it
    run.wait_ended(run.moment)
    leaver = daemons[run.rng.randrange(count)]
    ids = run.instance_ids(leaver)
    run.notes.update(instances=count, open_at_leave=checks.open_tasks(dsn))
    leaver.signal(15)
    code = leaver.wait(60)
    violations = run.finish(scripts, must_finish=True)
    if code != 0:
        violations.append(f"the leaving instance exited with {code}, not 0:\n{leaver.log()[-2000:]}")
    if held_by(dsn, ids):
        violations.append("the leaving instance still holds partitions after it exited")
    # A graceful leave settles what it runs: nothing it had claimed ran twice.
    rerun = query(dsn, "SELECT id, action, attempts FROM tasks WHERE attempts > 1 AND id IN "
                       "(SELECT id FROM tasks WHERE claimed_by = ANY(%s))", (ids,))
    violations += [f"a task of the leaving instance ran twice: {r}" for r in rerun]
    verdict(violations)


def test_frozen_mid_handover(seed: int, dsn: str, make_run: Any) -> None:
    run: FaultRun = make_run("frozen_handover", seed, dsn)
    run.add_hosts()
    givers = start_instances(run, 2)
    scripts = run.workload()
    assert run.moment is not None  # workload() draws it
    # Early (by the time every VM had its first task at most): a giver must still run a task of a
    # partition it will give away, and with half the work ended, the VMs left with work could all be
    # in partitions their holders keep (seeds 7 and 18 ran out of work so, on a loaded machine).
    run.wait_ended(min(run.moment, len(scripts)))
    ids = {d.pid: run.instance_ids(d)[-1] for d in givers}
    # What each giver will hand over once a third instance joins (the balancing is deterministic;
    # the joiner's id is higher than theirs, which is all the plan depends on).
    partitions = int(query(dsn, "SELECT partitions AS p FROM cluster_settings")[0]["p"])
    owners = {r["partition"]: r["instance_id"] for r in query(dsn, "SELECT partition, instance_id "
                                                                  "FROM partition_leases")}
    target = assignment([*ids.values(), 2**62], owners, partitions)
    gives = {i: [p for p, o in owners.items() if o == i and target[p] != i] for i in ids.values()}
    order = givers if run.rng.random() < 0.5 else givers[::-1]
    held_task: dict[str, Any] = {}

    def stop_a_shard_running_a_task_to_hand_over() -> bool:
        """SIGSTOP a giver's shard, and keep it stopped if it holds a task (running in the database) of a
        partition the giver is about to give away: that partition then stays mid-hand-over (releasing) for
        as long as we like. Stopped first, then looked at: a stopped shard cannot end its task meanwhile."""
        if not checks.open_tasks(dsn):
            raise AssertionError("inconclusive: the work ended before a giver ran a task it will hand over: "
                                 f"{ {i: len(g) for i, g in gives.items()} } partitions to give")
        for giver in order:
            me = ids[giver.pid]
            for slot, pid in sorted((int(k.split()[1]), v) for k, v in giver.child_pids().items()
                                    if k.startswith("shard ")):
                run.frozen.add(giver.pid)  # whatever happens, close() continues the group
                os.kill(pid, signal.SIGSTOP)
                rows = query(dsn, "SELECT id, partition FROM tasks WHERE state = 'running' AND claimed_by = %s "
                                  "AND run_by_shard = %s AND partition = ANY(%s) ORDER BY id LIMIT 1",
                             (me, slot, gives[me]))
                if rows:
                    held_task.update(rows[0], giver=giver, shard_pid=pid)
                    return True
                os.kill(pid, signal.SIGCONT)
        return False

    wait_for(stop_a_shard_running_a_task_to_hand_over, 60, 0.002, "a giver to run a task it will hand over")
    victim, part = held_task["giver"], held_task["partition"]
    lost = ids[victim.pid]
    run.start_daemon(shards=SHARDS, multihost=True)

    def hand_over_begun() -> str | None:
        """'releasing' once the giver began handing the partition over; 'left' if it is no longer the
        giver's at all, which must not happen while its task runs there (the shard is stopped)."""
        row = query(dsn, "SELECT instance_id, releasing FROM partition_leases WHERE partition = %s", (part,))[0]
        if row["instance_id"] != lost:
            return "left"
        return "releasing" if row["releasing"] else None

    try:
        how = wait_for(hand_over_begun, 30, 0.02, "the giver to begin handing it over")
    except AssertionError as exc:  # say what the database held then, for whoever reads the failure
        task = query(dsn, "SELECT id, state, claimed_by, run_by_shard, partition FROM tasks WHERE id = %s",
                     (held_task["id"],))
        held = query(dsn, "SELECT instance_id, count(*) AS n, count(*) FILTER (WHERE releasing) AS releasing "
                          "FROM partition_leases GROUP BY instance_id ORDER BY instance_id")
        raise AssertionError(f"{exc}: partition {part} of instance {lost} (predicted to move: "
                             f"{part in gives[lost]}), its task {task}, leases per instance {held}") from None
    if how == "left":
        task = query(dsn, "SELECT id, state, claimed_by, run_by_shard FROM tasks WHERE id = %s",
                     (held_task["id"],))[0]
        verdict([f"hand-over: partition {part} left instance {lost} while its task ran there in a stopped "
                 f"shard: {task}; the leases now: "
                 f"{query(dsn, 'SELECT * FROM partition_leases WHERE partition = %s', (part,))}"])
    run.freeze(victim)  # the whole giver, in the middle of the hand-over
    frozen_at = query(dsn, "SELECT clock_timestamp() AS t")[0]["t"]
    more = run.rng.randint(5, 40)
    base = run.ended()
    wait_for(lambda: query(dsn, "SELECT lease_expires_at < clock_timestamp() AS x FROM instances WHERE id = %s",
                           (lost,))[0]["x"], 30, 0.05, "the frozen giver's lease to run out")
    wait_for(lambda: run.ended() >= base + more or not checks.open_tasks(dsn), 60, 0.05,
             "the other instances to go on")
    # Its partition went on without it: taken over with a higher token.
    wait_for(lambda: query(dsn, "SELECT 1 FROM partition_leases WHERE partition = %s AND instance_id <> %s",
                           (part, lost)), 30, 0.05, "the partition it was handing over to be taken over")
    ended_before = {r["id"] for r in query(dsn, "SELECT id FROM tasks WHERE claimed_by = %s AND state IN "
                                                "('finished', 'failed')", (lost,))}
    run.thaw(victim)
    run.notes.update(frozen_for_tasks=more, partition=part, held_task=held_task["id"])
    violations = run.finish(scripts, must_finish=True)
    late = query(dsn, "SELECT id, action, key_id, time_ended FROM tasks WHERE claimed_by = %s AND "
                      "state IN ('finished', 'failed') AND NOT (id = ANY(%s)) AND time_ended > %s",
                 (lost, list(ended_before), frozen_at))
    violations += [f"fencing: the frozen giver recorded an outcome after its lease ran out: {r}" for r in late]
    verdict(violations)
