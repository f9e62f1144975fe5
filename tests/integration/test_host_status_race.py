"""The host-status pass against a task that changes a VM while the pass reads its node.

The node is a stand-in whose domain listing runs "a task" (a row update, as
an action commits it) before it answers, so the answer is older than the
row: exactly the interleaving a busy node produces. The pass must leave such
a VM alone. The database is real; the end-to-end pass against real libvirt
nodes is in tests/acceptance/test_host_status.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import libvirt

from taskomatic.db.store import Store
from taskomatic.runtime.reconciler import PassResult, reconcile_once
from tests.helpers import execute, query


class _Domain:
    def __init__(self, uuid: str, state: int) -> None:
        self._uuid, self._state = uuid, state

    def UUIDString(self) -> str:  # libvirt's name
        return self._uuid

    def state(self) -> list[int]:
        return [self._state, 0]


class _Node:
    """listAllDomains runs ``meanwhile`` first, then answers with the listing taken before it."""

    def __init__(self, domains: list[_Domain], meanwhile: Callable[[], None]) -> None:
        self.domains, self.meanwhile = domains, meanwhile

    def listAllDomains(self, _flags: int) -> list[_Domain]:  # libvirt's name
        self.meanwhile()
        return self.domains


class _Connections:
    def __init__(self, node: _Node) -> None:
        self.node = node

    def get(self, _uri: str) -> Any:
        return self.node

    def is_open(self, _uri: str) -> bool:
        return False  # a fixed node, nothing kept to read again

    def drop(self, _uri: str) -> None:
        pass


def _host_and_vm(dsn: str, state: str) -> tuple[int, int, str]:
    host = query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                      "VALUES ('n1', 'test:///default', 'TEST', 4, 4194304) RETURNING id")[0]["id"]
    vm = query(dsn, "INSERT INTO vms (description, state, host_id) VALUES ('race', %s, %s) "
                    "RETURNING id, uuid::text AS uuid", (state, host))[0]
    return host, vm["id"], vm["uuid"]


def _task_changes_vm(dsn: str, vm: int, state: str) -> Callable[[], None]:
    def run() -> None:
        execute(dsn, "UPDATE vms SET state = %s, updated_at = clock_timestamp() WHERE id = %s", (state, vm))
    return run


def _pass(dsn: str, node: _Node) -> PassResult:
    """One host-status pass over a database whose every host is ``node``."""
    store = Store.open(dsn, "test")
    try:
        return reconcile_once(store, _Connections(node))  # type: ignore[arg-type]
    finally:
        store.close()


def _vm(dsn: str, vm: int) -> dict[str, Any]:
    return query(dsn, "SELECT state, host_id FROM vms WHERE id = %s", (vm,))[0]


def test_a_vm_resumed_while_its_node_is_listed_is_not_set_back(dsn: str) -> None:
    host, vm, uuid = _host_and_vm(dsn, "suspended")
    node = _Node([_Domain(uuid, libvirt.VIR_DOMAIN_PAUSED)], _task_changes_vm(dsn, vm, "running"))
    result = _pass(dsn, node)
    assert result.corrections == 0
    assert _vm(dsn, vm) == {"state": "running", "host_id": host}


def test_a_vm_changed_and_back_while_its_node_is_listed_is_left_alone(dsn: str) -> None:
    # Row 'running' before and after (say a restart: stopped, then started again), but
    # the listing was taken in between: the row's change, not its state, shows it.
    host, vm, _uuid = _host_and_vm(dsn, "running")
    node = _Node([], _task_changes_vm(dsn, vm, "running"))
    result = _pass(dsn, node)
    assert result.corrections == 0
    assert _vm(dsn, vm) == {"state": "running", "host_id": host}


def test_a_vm_nobody_touched_is_corrected(dsn: str) -> None:
    _host, vm, _uuid = _host_and_vm(dsn, "running")
    node = _Node([], lambda: None)
    result = _pass(dsn, node)
    assert result.corrections == 1
    assert _vm(dsn, vm) == {"state": "stopped", "host_id": None}


class _VanishingDomain(_Domain):
    """Listed, then undefined by a task before the pass asks its state."""

    def state(self) -> list[int]:
        error = libvirt.libvirtError("Domain not found: no domain with matching uuid")
        error.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, "Domain not found", 0, "", "", "", 0, 0)
        raise error


def test_a_domain_undefined_while_listed_does_not_make_its_host_unreachable(dsn: str) -> None:
    host, vm, uuid = _host_and_vm(dsn, "running")
    gone = _VanishingDomain("00000000-0000-0000-0000-000000000001", libvirt.VIR_DOMAIN_RUNNING)
    node = _Node([gone, _Domain(uuid, libvirt.VIR_DOMAIN_RUNNING)], lambda: None)
    result = _pass(dsn, node)
    assert (result.hosts_up, result.hosts_down, result.corrections) == (1, 0, 0)
    assert query(dsn, "SELECT state FROM hosts WHERE id = %s", (host,))[0]["state"] == "available"
    assert _vm(dsn, vm) == {"state": "running", "host_id": host}
