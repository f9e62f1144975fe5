"""A TCP proxy in front of the test PostgreSQL, to cut ONE client off from the database.

The embedded server listens on a unix socket only (``listen_addresses=`` in
taskomatic/embedded/postgres.py). The proxy listens on 127.0.0.1 (a free port
the kernel picks) and forwards each connection to that socket, byte for byte
(the SSL/GSS negotiation too: libpq asks, the server says no, both through the
proxy). Give its ``dsn`` to the one daemon to isolate; everyone else keeps
talking to the server directly.

- ``cut()``: every proxied connection is shut down at once (the client reads
  EOF, its backend sees the socket close and aborts its transaction, so no lock
  stays held), and while cut every new connection is accepted and closed at
  once: the client fails fast, as against a database that is away.
- ``restore()``: new connections go through again.
- ``close()``: stops the accept thread and every connection; idempotent.

Usage::

    with PgProxy(dsn) as proxy:
        daemon = Daemon(proxy.dsn, ...)
        proxy.cut(); ...; proxy.restore()
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator
from types import TracebackType

from psycopg2.extensions import make_dsn, parse_dsn

_CHUNK = 65536


def upstream_address(dsn: str) -> str | tuple[str, int]:
    """Where the server behind ``dsn`` listens: its unix socket path, or (host, port)."""
    params = parse_dsn(dsn)
    host = params.get("host") or "/var/run/postgresql"
    port = int(params.get("port") or 5432)
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return (host, port)


class PgProxy:
    """Forwards 127.0.0.1:<port> to the server of ``target_dsn``; see the module docstring."""

    def __init__(self, target_dsn: str) -> None:
        self.target_dsn = target_dsn
        self.upstream = upstream_address(target_dsn)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._threads: list[threading.Thread] = []
        self._cut = False
        self._closed = threading.Event()
        # Counters, for tests that want to see the client really tried.
        self.accepted = 0
        self.refused = 0
        self.severed = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"pgproxy:{self.port}", daemon=True)
        self._acceptor.start()

    # -- public API -------------------------------------------------------------------
    @property
    def dsn(self) -> str:
        """The target DSN with host/port pointing at the proxy (same database and user)."""
        return make_dsn(self.target_dsn, host="127.0.0.1", port=str(self.port))

    @property
    def is_cut(self) -> bool:
        return self._cut

    def connections(self) -> int:
        """Proxied connections open now."""
        with self._lock:
            return len(self._pairs)

    def cut(self) -> int:
        """Sever every proxied connection and refuse new ones; returns how many were severed."""
        with self._lock:
            self._cut = True
            pairs = list(self._pairs)
            self._pairs.clear()
        for pair in pairs:
            _sever(pair)
        self.severed += len(pairs)
        return len(pairs)

    def restore(self) -> None:
        """Let new connections through again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.cut()
        self._acceptor.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()
        for thread in list(self._threads):
            thread.join(5)

    def __enter__(self) -> PgProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------
    def _accept_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._closed.is_set():
                if not selector.select(timeout=0.1):
                    continue
                try:
                    client, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return
                client.setblocking(True)
                self._connect(client)
        finally:
            selector.close()

    def _connect(self, client: socket.socket) -> None:
        if self._cut or self._closed.is_set():
            self.refused += 1
            _close(client)
            return
        try:
            if isinstance(self.upstream, str):
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            else:
                server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            server.settimeout(5)
            server.connect(self.upstream)
            server.settimeout(None)
        except OSError:
            # The server itself is down: the client sees a closed connection, as it would.
            self.refused += 1
            _close(client)
            with contextlib.suppress(UnboundLocalError):
                _close(server)
            return
        pair = (client, server)
        with self._lock:
            if self._cut:  # cut while we were connecting
                self.refused += 1
                _sever(pair)
                return
            self._pairs.add(pair)
            self.accepted += 1
        for source, sink in ((client, server), (server, client)):
            thread = threading.Thread(target=self._pump, args=(pair, source, sink), daemon=True,
                                      name=f"pgproxy:{self.port}:pump")
            thread.start()
            self._threads.append(thread)
        self._threads = [t for t in self._threads if t.is_alive()]

    def _pump(self, pair: tuple[socket.socket, socket.socket], source: socket.socket,
              sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        # One side ended: end both (PostgreSQL's protocol has no half-close).
        with self._lock:
            self._pairs.discard(pair)
        _sever(pair)


def _sever(pair: tuple[socket.socket, socket.socket]) -> None:
    for sock in pair:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    for sock in pair:
        _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


@contextlib.contextmanager
def pg_proxy(target_dsn: str) -> Iterator[PgProxy]:
    """A running proxy for the duration of the block; always stopped after."""
    proxy = PgProxy(target_dsn)
    try:
        yield proxy
    finally:
        proxy.close()
