"""libvirt connections, cached per process and reopened after a failure."""

from __future__ import annotations

import logging
import threading

import libvirt

from taskomatic.actions.libvirt_util import libvirt_uri_problem

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


class _Opening:
    """One ``libvirt.open`` running in a thread of its own.

    Keepalive only starts once a connection is open, and opening has no timeout
    of its own: against a node that accepts the connection but never answers
    (its libvirtd paused, wedged, or a network that drops replies) ``libvirt.open``
    blocks for as long as the node stays silent. So the caller waits for it with
    a deadline instead, and an open that outlives it keeps running in the
    background: the next ``get`` of that URI waits for the same one, so a
    silent node costs one thread, not one per attempt.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.done = threading.Event()
        self.conn: libvirt.virConnect | None = None
        self.error: str | None = None
        threading.Thread(target=self._run, name=f"libvirt-open {uri}", daemon=True).start()

    def _run(self) -> None:
        try:
            self.conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            self.error = exc.get_error_message()
        except Exception as exc:  # never leave a waiter without an answer
            self.error = repr(exc)
        finally:
            self.done.set()


class LibvirtConnections:
    """One open connection per URI in this process (never shared across fork)."""

    def __init__(self, keepalive_interval: int = 5, keepalive_count: int = 3,
                 open_timeout: float | None = None) -> None:
        self._open: dict[str, libvirt.virConnect] = {}
        self._opening: dict[str, _Opening] = {}
        self.keepalive = (keepalive_interval, keepalive_count)
        # A node silent for as long as keepalive would take to declare an open connection dead
        # (plus one interval) is unreachable for an open too.
        self.open_timeout = (open_timeout if open_timeout is not None
                             else max(1.0, float(keepalive_interval) * (keepalive_count + 1)))
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
        conn = self._connect(uri)
        try:
            conn.setKeepAlive(*self.keepalive)
        except libvirt.libvirtError:
            pass  # local drivers (test:///default) have no keepalive; nothing to detect there
        self._open[uri] = conn
        return conn

    def _connect(self, uri: str) -> libvirt.virConnect:
        """A new connection to ``uri``, or HostUnreachable (refused, failed, or no answer in time)."""
        problem = libvirt_uri_problem(uri)
        if problem is not None:
            # A URI that would make libvirt run a program is never opened, by an action or
            # by the host-status pass (which opens every host's URI): the host stays unreachable.
            raise HostUnreachable(problem)
        attempt = self._opening.get(uri)
        if attempt is None:
            attempt = self._opening[uri] = _Opening(uri)
        if not attempt.done.wait(self.open_timeout):
            raise HostUnreachable(f"cannot connect to {uri}: no answer within {self.open_timeout:g}s")
        del self._opening[uri]
        if attempt.conn is None:
            raise HostUnreachable(f"cannot connect to {uri}: {attempt.error}")
        return attempt.conn

    def is_open(self, uri: str) -> bool:
        """Is a connection to ``uri`` kept from earlier (get() would reuse it)?"""
        return uri in self._open

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
