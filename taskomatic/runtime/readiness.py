"""Which channels have something to read, without a selector built per look.

``multiprocess.connection.wait`` (and ``Connection.poll``, which calls it)
builds a selector, registers every object and closes it again at each call.
The fetcher looks several times per task (once per turn of its loop, once
more per message it reads), so that bookkeeping was a large share of its
Python time per task. ``Readiness`` keeps one ``select.poll`` for as long as
the set of objects it watches stays the same, and ``readable_now`` asks about
one object with a single poll call.
"""

from __future__ import annotations

import select
from collections.abc import Sequence
from typing import Any

_READ = select.POLLIN | select.POLLPRI


def readable_now(obj: Any) -> bool:
    """Has ``obj`` (anything with ``fileno()``) data, an end of file or an error to read now?"""
    poller = select.poll()
    poller.register(obj.fileno(), _READ)
    return bool(poller.poll(0))


class Readiness:
    """``wait(objects, timeout)``: the objects that are readable, as ``multiprocess.connection.wait``.

    The poll set is rebuilt whenever the objects differ from the last call's
    (compared by identity), so a closed channel, which its owner drops from
    the list before the next wait, is never polled again; a new object with a
    reused file descriptor is a different object and rebuilds it too.
    """

    def __init__(self) -> None:
        self._objects: tuple[Any, ...] = ()
        self._poller = select.poll()
        self._by_fd: dict[int, Any] = {}

    def wait(self, objects: Sequence[Any], timeout: float | None) -> list[Any]:
        if len(objects) != len(self._objects) or any(a is not b for a, b in zip(objects, self._objects, strict=True)):
            self._rebuild(tuple(objects))
        # Like selectors: any event (data, hang-up, error) counts as readable; the read says which.
        events = self._poller.poll(None if timeout is None else max(0.0, timeout) * 1000.0)
        return [self._by_fd[fd] for fd, _ in events if fd in self._by_fd]

    def _rebuild(self, objects: tuple[Any, ...]) -> None:
        self._objects = objects
        self._poller = select.poll()
        self._by_fd = {}
        for obj in objects:
            fd = obj.fileno()
            self._by_fd[fd] = obj
            self._poller.register(fd, _READ)
