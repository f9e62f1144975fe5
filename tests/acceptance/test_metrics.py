"""The Prometheus endpoint: off by default, on localhost when on, counting what the tasks table says."""

from __future__ import annotations

import os
import signal
import socket
import urllib.request
from pathlib import Path

import pytest

from taskomatic import __version__
from tests.acceptance import checks
from tests.helpers import execute, query, wait_for

# Slow (not in the inner loop): daemons scraped (tests/unit/test_metrics_collector.py is the quick part).
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_count_tasks_by_action_and_outcome(dsn, hosts, daemon_factory):
    prefix = checks.unique_prefix(dsn)
    port = _free_port()
    vms = checks.insert_vms(dsn, [f"{prefix}-m{i}" for i in range(3)])
    checks.insert_tasks(dsn, [("Vm", vm, a) for vm in vms for a in ("create_vm", "start_vm", "resume_vm")])
    checks.insert_tasks(dsn, [("Vm", vms[0], "fly_vm"), ("Vm", vms[0], "fly\" } evil{", {})])
    daemon = daemon_factory(shards=2, extra=["--set", f"metrics_port={port}"])
    checks.wait_all_ended(dsn, daemon)

    samples = _scrape(port)
    ended = {(r["action"], r["state"]): r["n"] for r in query(
        dsn, "SELECT action, state, count(*) AS n FROM tasks GROUP BY 1, 2")}
    for action, state in [("create_vm", "finished"), ("start_vm", "finished")]:
        assert samples[f'taskomatic_tasks_total{{action="{action}",outcome="{state}"}}'] == ended[(action, state)]
    # resume of a running VM is a no-op success; unknown actions are counted under one label.
    assert samples['taskomatic_tasks_total{action="resume_vm",outcome="finished"}'] == 3
    assert samples['taskomatic_tasks_total{action="unknown",outcome="failed"}'] == 2
    assert samples['taskomatic_task_duration_seconds_count{action="start_vm"}'] == 3
    assert samples["taskomatic_tasks_queued"] == 0
    assert samples["taskomatic_tasks_running"] == 0
    assert not any(name.startswith("taskomatic_queue_depth") for name in samples)  # replaced by the two above
    assert samples["taskomatic_oldest_queued_seconds"] == 0
    assert "taskomatic_claims_held" in samples and "taskomatic_shards_busy" in samples

    # Bound to localhost only: the port is not open on the machine's other addresses.
    table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    listening = [line.split()[1] for line in table if line.split()[3] == "0A"]  # state LISTEN
    ours = [addr for addr in listening if int(addr.split(":")[1], 16) == port]
    assert ours == ["0100007F:" + format(port, "04X")], ours


def test_metrics_are_off_by_default(dsn, daemon_factory):
    daemon = daemon_factory(shards=1)
    assert "metrics on http" not in daemon.log()


def _wait_seconds(dsn: str) -> list[float]:
    return [float(r["s"]) for r in query(
        dsn, "SELECT extract(epoch FROM time_started - created_at) AS s FROM tasks WHERE time_started IS NOT NULL")]


def test_metrics_show_wait_latency_build_database_nodes_and_restarts(dsn, hosts, daemon_factory):
    prefix = checks.unique_prefix(dsn)
    port = _free_port()
    # A third host whose libvirt never answers (disabled, so placement leaves it alone).
    execute(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory, state, is_disabled) "
                 "VALUES ('ghost', 'test+unix:///default?socket=/nonexistent/libvirt-sock', 'TEST', 4, 1048576, "
                 "'unavailable', true)")
    vms = checks.insert_vms(dsn, [f"{prefix}-w{i}" for i in range(4)])
    checks.insert_tasks(dsn, [("Vm", vm, a) for vm in vms for a in ("create_vm", "start_vm")])
    # Queued before the daemon starts: each waits at least the daemon's start-up.
    daemon = daemon_factory(shards=2, extra=["--set", f"metrics_port={port}", "--set", "reconcile_interval=1"])
    checks.wait_all_ended(dsn, daemon)

    samples = _scrape(port)
    assert samples[f'taskomatic_build_info{{version="{__version__}"}}'] == 1
    assert samples["taskomatic_database_up"] == 1
    assert samples["taskomatic_tasks_queued"] == 0 and samples["taskomatic_tasks_running"] == 0
    # Enqueue-to-start: one observation per task performed, each what the table says it waited.
    waits = _wait_seconds(dsn)
    count = samples["taskomatic_task_wait_seconds_count"]
    assert count == len(waits) == 8
    assert samples['taskomatic_task_wait_seconds_bucket{le="+Inf"}'] == count
    assert abs(samples["taskomatic_task_wait_seconds_sum"] - sum(waits)) < 0.001
    assert min(waits) > 0

    # Node up per host, from the host-status pass: the two live nodes up, the ghost down.
    names = {r["id"]: r["hostname"] for r in query(dsn, "SELECT id, hostname FROM hosts")}
    ghost = next(i for i, name in names.items() if name == "ghost")
    expected = {f'taskomatic_node_up{{host_id="{host_id}",hostname="{names[host_id]}"}}': 1.0 for host_id in hosts}
    expected[f'taskomatic_node_up{{host_id="{ghost}",hostname="ghost"}}'] = 0.0

    def nodes() -> dict[str, float]:
        return {name: value for name, value in _scrape(port).items() if name.startswith("taskomatic_node_up")}

    wait_for(lambda: nodes() == expected, 30, 0.2, f"node_up to be {expected}")

    # A shard killed is restarted and counted, by role.
    assert not any(name.startswith("taskomatic_child_restarts_total") for name in samples)
    os.kill(daemon.child_pids()["shard 1"], signal.SIGKILL)
    restarts = 'taskomatic_child_restarts_total{role="shard"}'
    wait_for(lambda: _scrape(port).get(restarts) == 1, 30, 0.2, "the shard's restart to be counted")
