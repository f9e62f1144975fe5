"""A unix-socket proxy in front of a libvirt node, to make the node answer with errors.

The daemon reaches the node through ``uri`` (the proxy's socket); the proxy
forwards each connection to the node's own socket byte for byte. ``break_()``
resets every proxied connection at once and, while broken, accepts each new
connection and closes it at once: every libvirt call and every connection
attempt then fails (end of file / connection reset), as against a node whose
daemon keeps crashing. ``repair()`` lets new connections through again.
``close()`` stops everything; idempotent. Only sockets of this process: nothing
outside the test is touched.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
from pathlib import Path

_CHUNK = 65536


class NodeProxy:
    def __init__(self, upstream: Path, path: Path) -> None:
        self.upstream = str(upstream)
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        os.chmod(path, 0o777)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._broken = False
        self._closed = threading.Event()
        self.refused = 0
        self.severed = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="nodeproxy", daemon=True)
        self._acceptor.start()

    def uri(self, driver: str = "test", path: str = "/default") -> str:
        return f"{driver}+unix://{path}?socket={self.path}"

    def break_(self) -> int:
        with self._lock:
            self._broken = True
            pairs = list(self._pairs)
            self._pairs.clear()
        for pair in pairs:
            _sever(pair)
        self.severed += len(pairs)
        return len(pairs)

    def repair(self) -> None:
        with self._lock:
            self._broken = False

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.break_()
        self._acceptor.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

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
        if self._broken or self._closed.is_set():
            self.refused += 1
            _reset(client)
            return
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.settimeout(5)
            server.connect(self.upstream)
            server.settimeout(None)
        except OSError:
            self.refused += 1
            _reset(client)
            _close(server)
            return
        pair = (client, server)
        with self._lock:
            if self._broken:
                self.refused += 1
                _sever(pair)
                return
            self._pairs.add(pair)
        for source, sink in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(pair, source, sink), daemon=True,
                             name="nodeproxy:pump").start()

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
        with self._lock:
            self._pairs.discard(pair)
        _sever(pair)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    _close(sock)


def _sever(pair: tuple[socket.socket, socket.socket]) -> None:
    for sock in pair:
        _reset(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
