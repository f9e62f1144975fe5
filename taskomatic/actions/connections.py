"""libvirt connections, cached per process and reopened after a failure."""

from __future__ import annotations

import logging
import threading

import libvirt

log = logging.getLogger(__name__)


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_quiet, None)


class HostUnreachable(Exception):
    """The node's libvirt could not be reached."""


_event_loop_started = False


def _start_event_loop() -> None:
    """libvirt's keepalive needs an event loop; run the default one in a thread.

    With keepalive, a node that stops answering (dead, paused, cut off) makes
    calls on its connection fail after interval x count seconds, instead of
    blocking a shard forever.
    """
    global _event_loop_started
    if _event_loop_started:
        return
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()
    _event_loop_started = True


class LibvirtConnections:
    """One open connection per URI in this process (never shared across fork)."""

    def __init__(self, keepalive_interval: int = 5, keepalive_count: int = 3) -> None:
        self._open: dict[str, libvirt.virConnect] = {}
        self.keepalive = (keepalive_interval, keepalive_count)
        _start_event_loop()

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
        try:
            conn.setKeepAlive(*self.keepalive)
        except libvirt.libvirtError:
            pass  # local drivers (test:///default) have no keepalive; nothing to detect there
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
