"""The Prometheus endpoint: off by default, on localhost when on, counting what the tasks table says."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

from tests.acceptance import checks
from tests.helpers import query


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
    assert samples['taskomatic_queue_depth{state="queued"}'] == 0
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
