"""Multihost, the plain case: two instances share one database and one workload."""

from __future__ import annotations

import random

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
