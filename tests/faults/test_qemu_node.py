"""Fault: a real QEMU node's libvirtd restarted with guests running, or a guest killed
behind taskomatic's back (issue 19).

Two private nodes with the qemu driver (real TCG guests, 64 MiB, diskless), one
standalone instance; a small workload (4 VMs x 8 lifecycle actions, all queued at
once: start, suspend/resume, poweroff, start again). At the seed's moment one of:

- ``restart``: the node's libvirtd stopped and started (guests keep running and are
  reattached, unlike the test driver's state);
- ``kill_daemon``: its libvirtd killed (kill -9) and started again (guests survive);
- ``kill_guest``: kill -9 of one running guest's QEMU process; libvirtd sees the
  domain shut off (crashed), taskomatic is not told.

Then the usual verdict: tasks ended once and in order; every row agrees with the
nodes (a guest that still runs is never marked stopped, a killed one ends stopped
with no host, corrected by the host-status pass or the next task); work queued after
the fault finishes. Tasks may fail (with a message): the killed guest's next actions.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import FaultRun
from tests.faults.test_faults import verdict
from tests.helpers import wait_for

QEMU = "/usr/bin/qemu-system-x86_64"
VMS, PER_VM = 4, 8
# TCG guests on a shared 2-core machine: a start may take seconds, so no shard is killed as stuck.
QEMU_ARGS = ["--set", "daemon.task_timeout=90"]


def qemu_script(rng: random.Random, length: int) -> list[str]:
    """create, start, then suspend/resume and poweroff/start (no graceful shutdown: no guest OS)."""
    script = ["create_vm", "start_vm"]
    state = "running"
    while len(script) < length:
        if state == "running":
            action = rng.choice(["suspend_vm", "suspend_vm", "poweroff_vm"])
        else:
            action = {"suspended": "resume_vm", "stopped": "start_vm"}[state]
        script.append(action)
        state = {"suspend_vm": "suspended", "poweroff_vm": "stopped"}.get(action, "running")
    return script


@pytest.fixture
def qemu_run(request: pytest.FixtureRequest, dsn: str) -> Iterator[Callable[[str, int], FaultRun]]:
    """make(fault, seed) -> a FaultRun on two qemu nodes of this test; all stopped at the end."""
    from taskomatic.embedded.libvirtd import ManagedNode

    if not os.access(QEMU, os.X_OK):
        pytest.skip(f"{QEMU} not installed (Debian: qemu-system-x86)")
    class Node(ManagedNode):
        """A node whose guests take VNC ports of their own: two libvirtds on one machine each pick
        a "free" port and race for it (qemu then fails: Address already in use), which separate
        machines never do."""

        def __init__(self, base: Path, name: str, ports: range) -> None:
            super().__init__(base, name, keep_test_state=False)
            self.ports = ports

        def _prepare(self) -> None:
            super()._prepare()
            with open(self.qemu_conf_path, "a") as conf:
                conf.write(f"remote_display_port_min = {self.ports.start}\n"
                           f"remote_display_port_max = {self.ports.stop - 1}\n")

    base = Path(tempfile.mkdtemp(prefix="tkm-fq-", dir="/tmp"))
    base.chmod(0o755)
    first = 20000 + (os.getpid() % 2000) * 20  # apart from other test processes' nodes (default 5900+)
    nodes = [Node(base, f"q{i}", range(first + 10 * i, first + 10 * i + 10)) for i in range(2)]
    runs: list[FaultRun] = []

    def make(fault: str, seed: int) -> FaultRun:
        for node in nodes:
            node.start()
        run = FaultRun(fault, seed, dsn, nodes, base / "run")
        runs.append(run)
        return run

    try:
        yield make
    finally:
        failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
        for run in runs:
            run.close(keep_logs_to=os.environ.get("TKM_KEEP_LOGS") if failed else None, test_name=request.node.name)
        for node in nodes:
            node.thaw()
            node.stop()  # destroys the guests, kills any it lost track of
        shutil.rmtree(base, ignore_errors=True)


def test_qemu_node(seed: int, qemu_run: Callable[[str, int], FaultRun]) -> None:
    run = qemu_run("qemu_node", seed)
    run.add_hosts(hypervisor="QEMU")
    run.start_daemon(shards=2, extra=QEMU_ARGS)
    run.later_work = lambda: run.script_workload(qemu_script, 2, 6, label="-later")
    scripts = run.script_workload(qemu_script, VMS, PER_VM)
    kind = run.rng.choice(["restart", "kill_daemon", "kill_guest"])
    run.moment = run.rng.randint(VMS + 2, VMS * PER_VM // 2)
    run.wait_ended(run.moment, timeout=240)
    victim = run.rng.randrange(len(run.nodes))
    if kind == "kill_guest":
        # A node with a guest running (the other one if the chosen node has none just now).
        def node_with_guest() -> Any:
            order = [run.nodes[victim], run.nodes[1 - victim]]
            return next((n for n in order if n.guest_pids()), None)

        node = wait_for(node_with_guest, 120, 0.05, "a running guest to kill")
        pid = run.rng.choice(sorted(node.guest_pids()))
        os.kill(pid, signal.SIGKILL)  # a guest of this test's own node, never anyone else's
        run.notes["killed_guest_on"] = node.name
    elif kind == "restart":
        run.nodes[victim].restart()
    else:
        run.nodes[victim].kill()
        run.nodes[victim].start()
    run.notes.update(kind=kind, node=victim)
    verdict(run.finish(scripts, must_finish=False, timeout=300))
