"""A shard whose lease ran out must not change a node: fencing covers libvirt calls, not only rows.

Found by the frozen_mid_handover fault (issue 19, seed 6): a giver's shard was stopped
(SIGSTOP) while it held a ``poweroff_vm`` marked running, before its libvirt call; the
whole giver was then frozen past its lease, and the taker reconciled the task ("interrupted
before it took effect", the VM still ran), ran it, and started the VM again. Thawed, the old
shard went on where it had stopped and destroyed the VM's domain: its outcome was refused
(fenced by partition token), but the node had changed behind the taker's back. The row said
running on host 1; the node had no domain.

Fencing the database is not enough: every step that changes a node checks the local copy of
the lease first (``ActionContext.ensure_lease``), so a process that wakes up after losing its
lease stops at its next node change. Here the interleaving is injected instead of hoped for:
two shards of two instances, driven step by step (tests/faults/shardlike.py), the giver's lease
made stale while its task is marked running, the taker settling the task and going on; then
the giver performs its plan. The last test audits every action's libvirt calls: none changes a
node without a lease check of its own just before it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from taskomatic.actions.base import LeaseExpired, Settlement
from taskomatic.config import Config
from tests.faults import checker
from tests.faults.harness import LEASE_SECONDS
from tests.faults.shardlike import ACTIONS, Shardlike, add_hosts, vm_on, vm_row

# How each action's start state is reached from "running on host A", and how the taker, having
# run the action again, brings the VM back to that start state (so the stale step would matter).
SCENARIOS: dict[str, tuple[list[str], list[str]]] = {
    "poweroff_vm": ([], ["start_vm"]),
    "shutdown_vm": ([], ["start_vm"]),
    "suspend_vm": ([], ["resume_vm"]),
    "resume_vm": (["suspend_vm"], ["suspend_vm"]),
    "save_vm": ([], ["restore_vm"]),
    "restore_vm": (["save_vm"], ["save_vm"]),
    "migrate_vm": ([], ["migrate_vm"]),
    "start_vm": (["poweroff_vm"], ["poweroff_vm"]),
}


@pytest.fixture
def save_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tkm-fence-save-", dir="/tmp"))
    path.chmod(0o777)  # the nodes' libvirtd writes the images
    try:
        yield path
    finally:
        for item in path.iterdir():
            item.unlink()
        path.rmdir()


@pytest.fixture
def shards(dsn: str, save_dir: Path) -> Iterator[Callable[[str], Shardlike]]:
    opened: list[Shardlike] = []

    def open_one(name: str) -> Shardlike:
        shard = Shardlike.open(dsn, Config(dsn=dsn, save_dir=str(save_dir)), name)
        opened.append(shard)
        return shard

    yield open_one
    for shard in opened:
        shard.close()


def node_state(nodes: list[Any]) -> dict[str, list[tuple[str, int, bool]]]:
    """Every domain of every node: (name, state, persistent)."""
    seen: dict[str, list[tuple[str, int, bool]]] = {}
    for node in nodes:
        conn = libvirt.open(node.test_uri)
        try:
            seen[node.test_uri] = sorted((d.name(), d.state()[0], bool(d.isPersistent()))
                                         for d in conn.listAllDomains(0))
        finally:
            conn.close()
    return seen


def args_for(action: str, vm_id: int, dsn: str, hosts: list[int]) -> dict[str, Any]:
    if action != "migrate_vm":
        return {}
    now_on = vm_row(dsn, vm_id)["host_id"]
    return {"host_id": next(h for h in hosts if h != now_on)}


@pytest.mark.parametrize("action", sorted(SCENARIOS))
def test_a_shard_thawed_after_its_lease_ran_out_leaves_the_node_alone(
        action: str, dsn: str, fault_nodes: list[Any], shards: Callable[[str], Shardlike], save_dir: Path) -> None:
    giver, taker = shards("giver"), shards("taker")
    hosts = add_hosts(dsn, fault_nodes)
    vm_id = vm_on(giver, hosts[0], f"fence-{action}")
    before, undo = SCENARIOS[action]
    for step in before:
        giver.run(vm_id, step)
    task = giver.submit(vm_id, action, args_for(action, vm_id, dsn, hosts))
    plan = giver.begin(task)  # marked running; the shard stops here (SIGSTOP, a paused VM...)

    giver.lease_good = False  # ...past its lease: another instance holds its partition now
    taker.adopt(task.id)
    settled = taker.reconcile(task)
    assert settled.kind == Settlement.NOT_STARTED, settled
    taker.record(task, "failed", f"test: settled by the taker ({settled.message})", settled.row_updates)
    taker.run(vm_id, action, args_for(action, vm_id, dsn, hosts))  # the work goes on without the giver
    for step in undo:
        taker.run(vm_id, step, args_for(step, vm_id, dsn, hosts))
    assert not checker.vm_rows(dsn, save_dir=save_dir)
    nodes_then = node_state(fault_nodes)

    # Thawed: the giver goes on with its plan. Its first node change must stop it.
    with pytest.raises(LeaseExpired):
        ACTIONS[action].perform(giver.ctx, plan)
    giver.store.rollback()
    assert node_state(fault_nodes) == nodes_then
    assert checker.vm_rows(dsn, save_dir=save_dir) == []


# -- the audit: every node change has a lease check of its own just before it -------------------
NODE_CHANGES: dict[type, tuple[str, ...]] = {
    libvirt.virConnect: ("defineXML", "createXML", "restore", "restoreFlags", "storagePoolDefineXML",
                         "storagePoolCreateXML"),
    libvirt.virDomain: ("create", "createWithFlags", "destroy", "destroyFlags", "shutdown", "shutdownFlags",
                        "undefine", "undefineFlags", "suspend", "resume", "save", "saveFlags", "managedSave",
                        "migrate", "migrate2", "migrate3", "migrateToURI", "migrateToURI2", "migrateToURI3",
                        "reboot", "reset", "attachDevice", "detachDevice", "setMemory", "setVcpus"),
    libvirt.virStoragePool: ("create", "build", "undefine", "delete", "destroy", "createXML", "createXMLFrom"),
    libvirt.virStorageVol: ("delete", "wipe", "resize", "upload"),
}


class LeaseAudit:
    def __init__(self) -> None:
        self.fresh = False  # a lease check since the last node change
        self.checks = 0
        self.changes: list[str] = []
        self.unchecked: list[str] = []

    def lease_ok(self) -> bool:
        self.fresh = True
        self.checks += 1
        return True

    def wrap(self, cls: type, name: str) -> Callable[..., Any]:
        original = getattr(cls, name)

        def audited(this: Any, *args: Any, **kwargs: Any) -> Any:
            label = f"{cls.__name__}.{name}"
            self.changes.append(label)
            if not self.fresh:
                self.unchecked.append(f"{label} (after {self.changes[-2] if len(self.changes) > 1 else 'nothing'})")
            self.fresh = False
            return original(this, *args, **kwargs)

        return audited


def test_every_node_change_checks_the_lease_just_before(
        dsn: str, fault_nodes: list[Any], shards: Callable[[str], Shardlike], save_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    shard = shards("audited")
    hosts = add_hosts(dsn, fault_nodes)
    audit = LeaseAudit()
    shard.ctx.lease_ok = audit.lease_ok
    for cls, names in NODE_CHANGES.items():
        for name in names:
            if hasattr(cls, name):
                monkeypatch.setattr(cls, name, audit.wrap(cls, name))
    vm_id = vm_on(shard, hosts[0], "audited")
    for action in ["suspend_vm", "resume_vm", "save_vm", "restore_vm", "migrate_vm", "suspend_vm",
                   "migrate_vm", "resume_vm", "shutdown_vm", "start_vm", "poweroff_vm", "start_vm"]:
        shard.run(vm_id, action, args_for(action, vm_id, dsn, hosts))
    # clear_vms's children: a running VM migrates away, a stopped one's leftover definition goes.
    shard.run(vm_id, "evacuate_vm", {"from_host_id": vm_row(dsn, vm_id)["host_id"]})
    shard.run(vm_id, "poweroff_vm")
    assert len(audit.changes) >= 20, audit.changes  # the actions did change the nodes
    assert audit.unchecked == [], audit.unchecked


# -- the node's side: a frozen client loses its connection ------------------------------------------
_FROZEN_CLIENT = """
import sys
from taskomatic.actions.connections import LibvirtConnections
connections = LibvirtConnections(keepalive_interval=1, keepalive_count=2)
domain = connections.get(sys.argv[1]).lookupByName(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()  # it passed its lease check just before; it freezes here, before the call
try:
    domain.suspend()
    print("suspended", flush=True)
except Exception as exc:
    from taskomatic.actions.libvirt_util import is_transient
    print(f"refused: transient={is_transient(exc)}: {exc}", flush=True)
"""


def test_a_client_frozen_longer_than_the_nodes_keepalive_cannot_change_it_after(fault_nodes: list[Any]) -> None:
    """What no lease check can close, the node closes: a client frozen between its check and its call
    (the microseconds the checks leave open) loses its connection once the node's keepalive gives up
    on it (test nodes: about 2 s, shorter than a lease minus a renewal, as the README asks of real
    nodes), so the call fails when it thaws and the domain stays as the new holder left it."""
    import signal
    import subprocess
    import sys

    from bench.soak_sampling import node_clients, unix_sockets
    from tests.helpers import wait_for

    node = fault_nodes[0]
    conn = libvirt.open(node.test_uri)
    child = None
    try:
        domain = conn.defineXML("<domain type='test'><name>fenced</name><memory>65536</memory><vcpu>1</vcpu>"
                                "<os><type>hvm</type></os></domain>")
        domain.create()

        def clients() -> int:
            return node_clients(node.pid, str(node.socket_path), unix_sockets())

        alone = clients()
        child = subprocess.Popen([sys.executable, "-c", _FROZEN_CLIENT, node.test_uri, "fenced"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        assert clients() == alone + 1
        child.send_signal(signal.SIGSTOP)
        wait_for(lambda: clients() == alone, 30, 0.1, "the node to close the frozen client's connection")
        child.stdin.write("go\n")
        child.stdin.flush()
        child.send_signal(signal.SIGCONT)
        said = child.stdout.readline().strip()
        # "client socket is closed" or "Cannot write data: Broken pipe", from the RPC layer: a node fault
        # to the shard (retried after its lease is back, by then on another instance), never a success.
        assert said.startswith("refused: transient=True"), said
        assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # unchanged
        assert child.wait(30) == 0
        # ...and it gives up sooner than anyone can take over (libvirtd's default is 5 s x 6).
        settings = dict(line.replace(" ", "").split("=", 1) for line in node.conf_path.read_text().splitlines()
                        if line.startswith("keepalive_"))
        gives_up_after = int(settings["keepalive_interval"]) * (int(settings["keepalive_count"]) + 1)
        assert gives_up_after < LEASE_SECONDS - 1, (gives_up_after, LEASE_SECONDS)  # a lease minus a renewal (1 s)
    finally:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
            child.wait(10)
        conn.close()
