"""The host-status pass finds what moved: a domain running on a host its row does not name
is recorded there (unless a task of the VM runs), and a saved VM whose image is gone is
stopped. Real database; the nodes are stand-ins answering what libvirt would (the end-to-end
pass on real QEMU guests is in tests/acceptance/test_fleets.py)."""

from __future__ import annotations

import logging
from typing import Any

import libvirt
import pytest

from taskomatic.db.store import Store
from taskomatic.runtime.reconciler import PassResult, reconcile_once
from tests.helpers import query

SAVE_DIR = "/srv/save"


class _Domain:
    def __init__(self, uuid: str, state: int) -> None:
        self.uuid, self._state, self.undefined = uuid, state, False

    def UUIDString(self) -> str:  # libvirt's name
        return self.uuid

    def state(self) -> list[int]:
        return [self._state, 0]

    def undefine(self) -> None:
        self.undefined = True


class _Node:
    def __init__(self, domains: list[_Domain] | None = None, images: set[str] | None = None) -> None:
        self.domains = domains or []
        self.images = images or set()

    def listAllDomains(self, flags: int) -> list[_Domain]:  # libvirt's name
        if flags & libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE:
            return [d for d in self.domains if d.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF]
        return self.domains

    def saveImageGetXMLDesc(self, path: str, _flags: int) -> str:  # libvirt's name
        if path not in self.images:
            # What a qemu node answers for a missing file.
            raise _system_error(f"Failed to open file '{path}': No such file or directory")
        return "<domain/>"


def _system_error(message: str) -> libvirt.libvirtError:
    error = libvirt.libvirtError(message)
    error.err = (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_NONE, message, 2, "", "", None, 0, 0)
    return error


class _Connections:
    def __init__(self, nodes: dict[str, _Node]) -> None:
        self.nodes = nodes

    def get(self, uri: str) -> Any:
        return self.nodes[uri]

    def is_open(self, _uri: str) -> bool:
        return False  # a fixed node, nothing kept to read again

    def drop(self, _uri: str) -> None:
        pass


def _hosts(dsn: str) -> list[int]:
    return [query(dsn, "INSERT INTO hosts (hostname, libvirt_uri, hypervisor_type, num_cpus, memory) "
                       "VALUES (%s, %s, 'TEST', 4, 4194304) RETURNING id", (f"n{i}", f"test:///n{i}"))[0]["id"]
            for i in range(2)]


def _vm(dsn: str, state: str, host: int | None) -> tuple[int, str]:
    row = query(dsn, "INSERT INTO vms (description, state, host_id, memory_allocated) VALUES ('moved', %s, %s, 65536) "
                     "RETURNING id, uuid::text AS uuid", (state, host))[0]
    return row["id"], row["uuid"]


def _row(dsn: str, vm: int) -> dict[str, Any]:
    return query(dsn, "SELECT state, host_id, memory_used FROM vms WHERE id = %s", (vm,))[0]


def _pass(dsn: str, nodes: dict[str, _Node]) -> PassResult:
    store = Store.open(dsn, "test")
    try:
        return reconcile_once(store, _Connections(nodes), SAVE_DIR)  # type: ignore[arg-type]
    finally:
        store.close()


@pytest.mark.parametrize("row_host", ["other", "none"])
def test_a_domain_running_where_its_row_does_not_say_is_recorded_there(dsn: str, row_host: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    a, b = _hosts(dsn)
    vm, uuid = _vm(dsn, "running" if row_host == "other" else "stopped", a if row_host == "other" else None)
    nodes = {"test:///n0": _Node(), "test:///n1": _Node([_Domain(uuid, libvirt.VIR_DOMAIN_RUNNING)])}
    with caplog.at_level(logging.INFO, logger="taskomatic.runtime.reconciler"):
        first = _pass(dsn, nodes)
        second = _pass(dsn, nodes)
    assert _row(dsn, vm) == {"state": "running", "host_id": b, "memory_used": 65536}
    assert (first.corrections, second.corrections) == (1, 0)
    logged = [r.getMessage() for r in caplog.records if f"VM {vm} " in r.getMessage()]
    assert len(logged) == 1 and "recorded where it is" in logged[0] and "n1" in logged[0], logged


def test_a_paused_domain_is_recorded_suspended(dsn: str) -> None:
    a, b = _hosts(dsn)
    vm, uuid = _vm(dsn, "running", a)
    _pass(dsn, {"test:///n0": _Node(), "test:///n1": _Node([_Domain(uuid, libvirt.VIR_DOMAIN_PAUSED)])})
    assert _row(dsn, vm)["state"] == "suspended" and _row(dsn, vm)["host_id"] == b


def test_a_task_in_flight_wins(dsn: str) -> None:
    a, _b = _hosts(dsn)
    vm, uuid = _vm(dsn, "migrating", a)
    elsewhere = query(dsn, "INSERT INTO instances (hostname, pid, version, mode, shards) "
                           "VALUES ('elsewhere', 1, 'test', 'standalone', 1) RETURNING id")[0]["id"]
    query(dsn, "INSERT INTO tasks (task_target_type, task_target_id, action, state, time_started, claimed_by) "
               "VALUES ('Vm', %s, 'migrate_vm', 'running', clock_timestamp(), %s) RETURNING id", (vm, elsewhere))
    result = _pass(dsn, {"test:///n0": _Node(), "test:///n1": _Node([_Domain(uuid, libvirt.VIR_DOMAIN_RUNNING)])})
    assert result.corrections == 0
    assert _row(dsn, vm)["state"] == "migrating" and _row(dsn, vm)["host_id"] == a


def test_a_domain_active_on_two_hosts_is_left_for_later(dsn: str) -> None:
    _hosts(dsn)
    vm, uuid = _vm(dsn, "stopped", None)
    _pass(dsn, {"test:///n0": _Node([_Domain(uuid, libvirt.VIR_DOMAIN_RUNNING)]),
                "test:///n1": _Node([_Domain(uuid, libvirt.VIR_DOMAIN_PAUSED)])})
    assert _row(dsn, vm)["host_id"] is None


def test_a_saved_vm_whose_image_is_gone_is_stopped_once(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    a, _b = _hosts(dsn)
    lost, lost_uuid = _vm(dsn, "saved", a)
    kept, kept_uuid = _vm(dsn, "saved", a)
    leftover = _Domain(lost_uuid, libvirt.VIR_DOMAIN_SHUTOFF)
    node = _Node([leftover, _Domain(kept_uuid, libvirt.VIR_DOMAIN_SHUTOFF)],
                 images={f"{SAVE_DIR}/taskomatic-vm{kept}-{kept_uuid}.save"})
    nodes = {"test:///n0": node, "test:///n1": _Node()}
    with caplog.at_level(logging.INFO, logger="taskomatic.runtime.reconciler"):
        assert _pass(dsn, nodes).corrections == 1
        assert _pass(dsn, nodes).corrections == 0
    assert _row(dsn, lost) == {"state": "stopped", "host_id": None, "memory_used": 0}
    assert _row(dsn, kept)["state"] == "saved" and _row(dsn, kept)["host_id"] == a
    assert leftover.undefined, "the definition left without its image should be removed"
    logged = [r.getMessage() for r in caplog.records if f"VM {lost} " in r.getMessage()]
    assert len(logged) == 1 and "image" in logged[0] and "gone" in logged[0], logged


def test_a_node_that_cannot_read_images_loses_nothing(dsn: str) -> None:
    a, _b = _hosts(dsn)
    vm, uuid = _vm(dsn, "saved", a)

    class _NoSupport(_Node):
        def saveImageGetXMLDesc(self, path: str, _flags: int) -> str:  # libvirt's name
            error = libvirt.libvirtError("this function is not supported")
            error.err = (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_FROM_NONE, "unsupported", 2, "", "", None, 0, 0)
            raise error

    _pass(dsn, {"test:///n0": _NoSupport([_Domain(uuid, libvirt.VIR_DOMAIN_SHUTOFF)]), "test:///n1": _Node()})
    assert _row(dsn, vm)["state"] == "saved"
