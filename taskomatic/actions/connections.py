"""libvirt connections, cached per process and reopened after a failure."""

from __future__ import annotations

import logging

import libvirt

log = logging.getLogger(__name__)


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_quiet, None)


class HostUnreachable(Exception):
    """The node's libvirt could not be reached."""


class LibvirtConnections:
    """One open connection per URI in this process (never shared across fork)."""

    def __init__(self) -> None:
        self._open: dict[str, libvirt.virConnect] = {}

    def get(self, uri: str) -> libvirt.virConnect:
        conn = self._open.get(uri)
        if conn is not None:
            try:
                if conn.isAlive():
                    return conn
            except libvirt.libvirtError:
                pass
            self.drop(uri)
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise HostUnreachable(f"cannot connect to {uri}: {exc.get_error_message()}") from None
        self._open[uri] = conn
        return conn

    def drop(self, uri: str) -> None:
        """Forget a connection that failed, so the next call reopens it."""
        conn = self._open.pop(uri, None)
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    def close_all(self) -> None:
        for uri in list(self._open):
            self.drop(uri)
