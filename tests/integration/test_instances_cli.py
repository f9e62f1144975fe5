"""`taskomatic instances`: every instance's state, lease and holdings (the real CLI as a subprocess).

Instances are registered with the daemon's own register_instance query; their
clocks (heartbeat, lease, stop) are then set with SQL relative to the
database's clock, which is the one the command judges by.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from taskomatic import cli_status as cli_mod
from taskomatic.db.store import Store
from taskomatic.model import OrderingKey
from taskomatic.partitions import DEFAULT_PARTITIONS, partition_of
from tests.helpers import REPO, query


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskomatic", *args, "--dsn", dsn], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


def instances_json(dsn: str, *args: str) -> dict[int, dict[str, Any]]:
    done = cli(dsn, "instances", "--json", *args)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["instances"]
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids, reverse=True), "newest first"
    return {r["id"]: r for r in rows}


def register(dsn: str, mode: str, hostname: str = "node-a", pid: int = 4242, shards: int = 2,
             lease: float | None = 30.0) -> int:
    store = Store.open(dsn, "test_instances_cli", timeout=10)
    try:
        with store.transaction():
            instance_id = store.scalar("register_instance", hostname=hostname, pid=pid, version="test",
                                       mode=mode, shards=shards, lease=lease if mode == "multihost" else None)
    finally:
        store.close()
    assert isinstance(instance_id, int)
    return instance_id


def age(dsn: str, instance_id: int, heartbeat: float = 0.0, lease: float | None = None,
        stopped: float | None = None) -> None:
    """Heartbeat `heartbeat` s ago; lease ending in `lease` s (negative: ran out); stopped `stopped` s ago."""
    query(dsn, "UPDATE instances SET heartbeat_at = clock_timestamp() - make_interval(secs => %(hb)s), "
               "lease_expires_at = CASE WHEN %(lease)s::float8 IS NULL THEN lease_expires_at "
               "ELSE clock_timestamp() + make_interval(secs => %(lease)s) END, "
               "stopped_at = CASE WHEN %(stopped)s::float8 IS NULL THEN NULL "
               "ELSE clock_timestamp() - make_interval(secs => %(stopped)s) END "
               "WHERE id = %(id)s RETURNING id",
          {"hb": heartbeat, "lease": lease, "stopped": stopped, "id": instance_id})


def hold(dsn: str, instance_id: int, vm: int, claimed: int = 0, running: int = 0, releasing: bool = False) -> None:
    """The lease of Vm `vm`'s partition, with `claimed` queued and `running` running tasks of it, held by the
    instance (the VMs of one test are in distinct partitions)."""
    query(dsn, "UPDATE partition_leases SET instance_id = %s, token = nextval('partition_lease_tokens'), "
               "releasing = %s WHERE partition = %s RETURNING token",
          (instance_id, releasing, partition_of(OrderingKey("Vm", vm), DEFAULT_PARTITIONS)))
    for state, n in (("queued", claimed), ("running", running)):
        for _ in range(n):
            query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, state, claimed_by, claimed_at, "
                       "time_started) VALUES ('Vm', %s, 'start_vm', %s, %s, clock_timestamp(), "
                       "CASE WHEN %s = 'running' THEN clock_timestamp() END) RETURNING id",
                  (vm, state, instance_id, state))


@pytest.fixture
def fleet(dsn: str) -> dict[str, int]:
    """One instance of each kind the command must tell apart, by name."""
    f = {}
    f["stopped_long_ago"] = register(dsn, "multihost", hostname="node-old")
    age(dsn, f["stopped_long_ago"], heartbeat=2 * 86400, lease=-2 * 86400, stopped=2 * 86400)
    f["crashed_long_ago"] = register(dsn, "standalone", hostname="node-old")
    age(dsn, f["crashed_long_ago"], heartbeat=86400)
    f["stopped_holding"] = register(dsn, "multihost", hostname="node-c")
    age(dsn, f["stopped_holding"], heartbeat=3 * 3600, lease=-3 * 3600, stopped=3 * 3600)
    hold(dsn, f["stopped_holding"], vm=31, running=1)
    f["stopped_recently"] = register(dsn, "multihost", hostname="node-c")
    age(dsn, f["stopped_recently"], heartbeat=600, lease=-600, stopped=600)
    f["standalone_silent"] = register(dsn, "standalone", hostname="node-s")
    age(dsn, f["standalone_silent"], heartbeat=45)
    f["standalone_live"] = register(dsn, "standalone", hostname="node-s", shards=8)
    age(dsn, f["standalone_live"], heartbeat=5)
    f["expired"] = register(dsn, "multihost", hostname="node-b", pid=5151)
    age(dsn, f["expired"], heartbeat=20, lease=-12)
    hold(dsn, f["expired"], vm=20, claimed=2, running=1)
    f["live"] = register(dsn, "multihost", hostname="node-a", pid=4242, shards=4)
    age(dsn, f["live"], heartbeat=1, lease=25)
    hold(dsn, f["live"], vm=10, claimed=3, running=1)
    hold(dsn, f["live"], vm=11)
    hold(dsn, f["live"], vm=12, claimed=1, releasing=True)
    # Finished, failed and unclaimed tasks count for nobody.
    query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, state, claimed_by, message) "
               "VALUES ('Vm', 10, 'start_vm', 'finished', %(live)s, NULL), "
               "('Vm', 10, 'start_vm', 'failed', %(live)s, 'boom'), ('Vm', 99, 'start_vm', 'queued', NULL, NULL) "
               "RETURNING id", {"live": f["live"]})
    return f


def test_states_and_holdings(dsn: str, fleet: dict[str, int]) -> None:
    rows = instances_json(dsn, "--all")
    assert set(rows) == set(fleet.values())
    state = {name: rows[i]["state"] for name, i in fleet.items()}
    assert state == {
        "stopped_long_ago": "stopped", "crashed_long_ago": "expired", "stopped_holding": "stopped",
        "stopped_recently": "stopped", "standalone_silent": "expired", "standalone_live": "live",
        "expired": "expired", "live": "live"}

    live = rows[fleet["live"]]
    assert (live["hostname"], live["pid"], live["mode"], live["shards"]) == ("node-a", 4242, "multihost", 4)
    assert (live["partitions_held"], live["partitions_releasing"], live["tasks_claimed"],
            live["tasks_running"]) == (3, 1, 4, 1)
    assert 20 < live["lease_left"] <= 25 and 1 <= live["heartbeat_age"] < 10
    assert live["stopped_at"] is None and live["started_at"]
    expired = rows[fleet["expired"]]
    assert (expired["partitions_held"], expired["tasks_claimed"], expired["tasks_running"]) == (1, 2, 1)
    assert -20 < expired["lease_left"] < -12
    standalone = rows[fleet["standalone_live"]]
    assert standalone["lease_left"] is None and standalone["shards"] == 8
    assert (standalone["partitions_held"], standalone["tasks_claimed"], standalone["tasks_running"]) == (0, 0, 0)
    assert rows[fleet["stopped_holding"]]["tasks_running"] == 1
    assert rows[fleet["stopped_recently"]]["stopped_at"] is not None


def test_standalone_is_live_while_its_heartbeat_is_recent(dsn: str) -> None:
    # Three heartbeat intervals of the supervisor.
    from taskomatic.runtime.supervisor import HEARTBEAT_INTERVAL

    assert cli_mod.SILENT_AFTER == 3 * HEARTBEAT_INTERVAL
    instance = register(dsn, "standalone")
    age(dsn, instance, heartbeat=cli_mod.SILENT_AFTER - 3)
    assert instances_json(dsn)[instance]["state"] == "live"
    age(dsn, instance, heartbeat=cli_mod.SILENT_AFTER + 1)
    assert instances_json(dsn)[instance]["state"] == "expired"


@pytest.mark.slow
def test_multihost_state_follows_the_lease_not_the_heartbeat(dsn: str) -> None:
    instance = register(dsn, "multihost", lease=2.0)
    age(dsn, instance, heartbeat=300, lease=2.0)  # a stale heartbeat does not matter while the lease is live
    assert instances_json(dsn)[instance]["state"] == "live"
    time.sleep(2.5)  # the database's clock runs the lease out
    row = instances_json(dsn)[instance]
    assert row["state"] == "expired" and row["lease_left"] < 0
    age(dsn, instance, heartbeat=0, lease=30, stopped=0)  # a stop wins over a live lease
    assert instances_json(dsn)[instance]["state"] == "stopped"


def test_default_leaves_out_only_what_is_long_gone_and_holds_nothing(dsn: str, fleet: dict[str, int]) -> None:
    rows = instances_json(dsn)
    assert set(rows) == set(fleet.values()) - {fleet["stopped_long_ago"], fleet["crashed_long_ago"]}
    # A long-lived instance older than many short-lived, long-stopped ones is still listed.
    for _ in range(5):
        age(dsn, register(dsn, "standalone", hostname="churn"), heartbeat=7200, stopped=7200)
    assert set(instances_json(dsn, "--limit", "3")) == {fleet["live"], fleet["expired"], fleet["standalone_live"]}
    assert fleet["live"] in instances_json(dsn)


def test_all_and_limit(dsn: str, fleet: dict[str, int]) -> None:
    assert list(instances_json(dsn, "--all", "--limit", "2")) == [fleet["live"], fleet["expired"]]
    assert len(instances_json(dsn, "--all")) == len(fleet)
    bad = cli(dsn, "instances", "--limit", "0")
    assert bad.returncode == 2


def test_table_for_the_terminal(dsn: str, fleet: dict[str, int]) -> None:
    done = cli(dsn, "instances")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ID", "HOSTNAME", "PID", "MODE", "SHARDS", "STARTED", "STATE", "HEARTBEAT",
                                "LEASE", "PARTITIONS", "CLAIMED", "RUNNING"]
    by_id = {line.split()[0]: line for line in lines[1:] if line.startswith("#")}
    assert set(by_id) == {f"#{i}" for name, i in fleet.items() if not name.endswith("long_ago")}
    live = by_id[f"#{fleet['live']}"].split()
    assert live[1:5] == ["node-a", "4242", "multihost", "4"] and "live" in live
    assert live[-6:] == ["3", "(1", "handing", "over)", "4", "1"] and "left" in live
    expired = by_id[f"#{fleet['expired']}"]
    assert "expired" in expired and "ran out" in expired and expired.split()[-3:] == ["1", "2", "1"]
    assert by_id[f"#{fleet['standalone_live']}"].split()[-3:] == ["0", "0", "0"]
    notes = [line for line in lines if line.startswith("note:")]
    assert any(f"#{fleet['expired']} is expired" in n and "a live multihost instance takes them over" in n
               for n in notes), notes
    assert any(f"#{fleet['stopped_holding']} is stopped" in n for n in notes), notes
    assert "2 stopped or dead for over an hour not shown; --all lists them" in done.stdout

    everything = cli(dsn, "instances", "--all").stdout
    assert f"#{fleet['stopped_long_ago']} " in everything and "not shown" not in everything


def test_empty_database(dsn: str) -> None:
    assert instances_json(dsn) == {}
    done = cli(dsn, "instances")
    assert done.returncode == 0 and "no instances" in done.stdout


def test_unreachable_database_exits_4(tmp_path: Path) -> None:
    done = cli(f"host={tmp_path / 'nowhere'} dbname=taskomatic", "instances", "--set", "connect_timeout=1")
    assert done.returncode == 4 and "cannot connect to the database" in done.stderr
    assert "Traceback" not in done.stderr


def test_unmigrated_database_exits_8(empty_dsn: str) -> None:
    done = cli(empty_dsn, "instances")
    assert done.returncode == 8 and "db upgrade" in done.stderr
