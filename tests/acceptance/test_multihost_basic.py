"""Multihost, the plain case: two instances share one database and one workload."""

from __future__ import annotations

import random

import pytest

from tests.acceptance import checks
from tests.helpers import query

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
    assert query(dsn, "SELECT count(*) AS n FROM key_claims")[0]["n"] == 0  # drained keys were released
    assert first.process.poll() is None and second.process.poll() is None
