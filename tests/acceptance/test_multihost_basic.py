"""Multihost, the plain case: two instances share one database and one workload."""

from __future__ import annotations

import os
import random
import signal

import pytest

from tests.acceptance import checks
from tests.helpers import query, wait_for

# Slow (not in the inner loop): two instances sharing a workload.
pytestmark = pytest.mark.slow

MULTIHOST = ["--mode", "multihost", "--set", "multihost.lease_seconds=3",
             "--set", "multihost.lease_renew_interval=1"]


@pytest.fixture
def prefix(dsn, libvirt_nodes):
    name = checks.unique_prefix(dsn)
    yield name
    checks.remove_domains([n.test_uri for n in libvirt_nodes], name)


def test_two_instances_share_the_work_in_order(dsn, hosts, daemon_factory, prefix):
    rng = random.Random(prefix)
    vm_ids = checks.insert_vms(dsn, [f"{prefix}-mh-{i:03d}" for i in range(40)])
    scripts = {vm: checks.lifecycle_script(rng, 8) for vm in vm_ids}
    checks.insert_rounds(dsn, scripts, range(0, 1))
    first = daemon_factory(shards=2, extra=MULTIHOST)
    second = daemon_factory(shards=2, extra=MULTIHOST)
    checks.insert_rounds(dsn, scripts, range(1, 8))
    checks.wait_all_ended(dsn, first, timeout=120)

    assert checks.counts(dsn) == {"finished": 320}
    checks.assert_all_ended_once(dsn, single_attempt=True)
    checks.assert_key_order(dsn)
    by_instance = {r["claimed_by"]: r["n"] for r in query(
        dsn, "SELECT claimed_by, count(*) AS n FROM tasks GROUP BY claimed_by")}
    assert len(by_instance) == 2, by_instance
    # The partitions end up spread evenly: 128 each (P = 256), every one held.
    wait_for(lambda: sorted(r["n"] for r in query(
        dsn, "SELECT instance_id, count(*) AS n FROM partition_leases GROUP BY instance_id")) == [128, 128],
        30, 0.1, "the partitions to be split between the two instances")
    assert first.process.poll() is None and second.process.poll() is None


def test_lease_and_partition_metrics(dsn, hosts, daemon_factory, prefix):
    from tests.acceptance.test_metrics import _free_port, _scrape

    port = _free_port()
    vms = checks.insert_vms(dsn, [f"{prefix}-mm{i}" for i in range(6)])
    checks.insert_tasks(dsn, [("Vm", vm, a) for vm in vms for a in ("create_vm", "start_vm")])
    daemon = daemon_factory(shards=2, extra=[*MULTIHOST, "--set", f"metrics_port={port}"])
    checks.wait_all_ended(dsn, daemon)
    wait_for(lambda: query(dsn, "SELECT count(*) AS n FROM partition_leases WHERE instance_id IS NOT NULL")[0]["n"]
             == 256, 30, 0.1, "the lone instance to hold every partition")

    samples = _scrape(port)
    assert samples["taskomatic_lease_renewals_total"] >= 1
    assert samples["taskomatic_lease_losses_total"] == 0
    assert samples['taskomatic_partition_handovers_total{direction="taken"}'] == 256
    assert samples.get('taskomatic_partition_handovers_total{direction="given"}', 0) == 0
    assert samples["taskomatic_rebalance_rounds_total"] >= 1
    assert samples["taskomatic_partitions_held"] == 256
    assert samples['taskomatic_tasks_total{action="start_vm",outcome="finished"}'] == 6


def _instance_ids(dsn, daemon) -> list[int]:
    pids = [daemon.pid, *checks.live_group_members(daemon.pid)]
    return [r["id"] for r in query(dsn, "SELECT id FROM instances WHERE pid = ANY(%s) ORDER BY id", (pids,))]


@pytest.mark.parametrize("child_start", ["forkserver", "spawn"])
def test_metrics_go_on_across_a_rejoin(dsn, hosts, daemon_factory, prefix, child_start):
    """An instance that lost its lease rejoins under a new id: its counters go on from where they were,
    and what the supervisor counts afterwards (a child restarted) is served with the rest. (Both ways
    children start: forked by the fork server, which keeps the environment it started with, or spawned
    by the supervisor with its own.)"""
    from tests.acceptance.test_metrics import _free_port, _scrape

    port = _free_port()
    vms = checks.insert_vms(dsn, [f"{prefix}-mr{i}" for i in range(2)])
    checks.insert_tasks(dsn, [("Vm", vm, "create_vm") for vm in vms])
    daemon = daemon_factory(shards=2, extra=[*MULTIHOST, "--set", f"metrics_port={port}",
                                             "--set", f"child_start={child_start}"])
    checks.wait_all_ended(dsn, daemon)
    created = 'taskomatic_tasks_total{action="create_vm",outcome="finished"}'
    assert _scrape(port)[created] == 2
    old = wait_for(lambda: _instance_ids(dsn, daemon), 30, 0.1, "the instance to register")[-1]

    # Frozen past its lease: thawed, it finds the lease lost and rejoins under a new id.
    os.killpg(daemon.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: query(dsn, "SELECT lease_expires_at <= clock_timestamp() AS expired FROM instances "
                                    "WHERE id = %s", (old,))[0]["expired"], 30, 0.1, "the lease to run out")
    finally:
        os.killpg(daemon.pid, signal.SIGCONT)
    new = wait_for(lambda: [i for i in _instance_ids(dsn, daemon) if i > old], 60, 0.1,
                   "the instance to rejoin under a new id")[-1]
    wait_for(lambda: f"[instance {new} fetcher] taskomatic.runtime.fetcher: shard 1 connected" in daemon.log(),
             60, 0.1, f"instance {new} to be up")

    # The supervisor's first sample comes after the rejoin: a shard killed and restarted.
    os.kill(daemon.child_pids()["shard 1"], signal.SIGKILL)
    restarts = 'taskomatic_child_restarts_total{role="shard"}'
    wait_for(lambda: _scrape(port).get(restarts) == 1, 30, 0.2, "the shard's restart to be counted")
    checks.insert_tasks(dsn, [("Vm", vm, "start_vm") for vm in vms])
    checks.wait_all_ended(dsn, daemon)
    samples = _scrape(port)
    assert samples[created] == 2  # counted before the rejoin, still there
    assert samples['taskomatic_tasks_total{action="start_vm",outcome="finished"}'] == 2
    assert samples["taskomatic_lease_losses_total"] == 1
    assert daemon.process.poll() is None
