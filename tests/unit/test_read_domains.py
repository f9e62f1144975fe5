"""The host-status pass reads a node once more on a new connection when a kept one fails as the node's
fault: the node may have closed it (a restart, or this process frozen longer than the node's keepalive).
Fakes for the connections: the logic of when to retry and when a host counts as down."""

from __future__ import annotations

from typing import Any

import libvirt

from taskomatic.actions.connections import HostUnreachable
from taskomatic.runtime.reconciler import _read_domains

HOST = {"id": 1, "hostname": "n1", "libvirt_uri": "test+unix:///default?socket=/nowhere"}


def _error(domain: int, code: int = libvirt.VIR_ERR_INTERNAL_ERROR) -> libvirt.libvirtError:
    exc = libvirt.libvirtError("client socket is closed")
    exc.err = (code, domain, "client socket is closed", 2, None, None, None, 0, 0)
    return exc


class Domain:
    def UUIDString(self) -> str:
        return "u1"

    def state(self) -> list[int]:
        return [libvirt.VIR_DOMAIN_RUNNING, 0]


class Conn:
    def __init__(self, failure: libvirt.libvirtError | None) -> None:
        self.failure = failure

    def listAllDomains(self, flags: int) -> list[Any]:
        if self.failure is not None:
            raise self.failure
        return [Domain()]


class Connections:
    def __init__(self, kept: bool, conns: list[Any]) -> None:
        self.kept, self.conns, self.opened, self.dropped = kept, conns, 0, 0

    def is_open(self, uri: str) -> bool:
        return self.kept

    def get(self, uri: str) -> Any:
        conn = self.conns[self.opened]
        self.opened += 1
        if isinstance(conn, Exception):
            raise conn
        return conn

    def drop(self, uri: str) -> None:
        self.dropped += 1
        self.kept = False


def test_a_kept_connection_the_node_closed_is_replaced_before_the_host_counts_as_down() -> None:
    connections = Connections(True, [Conn(_error(libvirt.VIR_FROM_RPC)), Conn(None)])
    assert _read_domains(connections, HOST) == {"u1": "running"}  # type: ignore[arg-type]
    assert (connections.opened, connections.dropped) == (2, 1)


def test_a_new_connection_that_fails_is_not_tried_again() -> None:
    connections = Connections(False, [Conn(_error(libvirt.VIR_FROM_RPC)), Conn(None)])
    assert _read_domains(connections, HOST) is None  # type: ignore[arg-type]
    assert connections.opened == 1


def test_a_node_that_cannot_be_reached_again_counts_as_down() -> None:
    connections = Connections(True, [Conn(_error(libvirt.VIR_FROM_RPC)), HostUnreachable("refused")])
    assert _read_domains(connections, HOST) is None  # type: ignore[arg-type]
    assert connections.opened == 2


def test_a_request_the_node_refuses_is_not_retried() -> None:
    connections = Connections(True, [Conn(_error(libvirt.VIR_FROM_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)),
                                     Conn(None)])
    assert _read_domains(connections, HOST) is None  # type: ignore[arg-type]
    assert connections.opened == 1
