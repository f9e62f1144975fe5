"""Imported once, in the fork server, before it forks any child ("forkserver" start method).

Every child needs the interpreter, psycopg2, libvirt and multiprocess: imported
here once, they sit in pages the children share (copy-on-write) instead of each
child importing its own copy (41-45 MB RSS, ~21 MB of it unique, per shard when
spawned). gc.freeze() moves the imported objects to the permanent generation,
so a child's collections never write to them (which would copy their pages).

The fork server is started by the supervisor as a fresh interpreter with only
its listening socket and a pipe: it holds no database or libvirt connection,
no thread and no lock, so neither do the children it forks; each opens its own.
Nothing here may open a connection or start a thread. For that reason the
plugins' action modules are not preloaded (their import is not ours to vet);
each shard imports them (~0.5 MB of its unique memory).
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import signal
import sys
import tempfile

# Collections during the imports would free objects and leave holes in pages
# the children then share half-used; collect once, at the end, instead.
gc.disable()

import libvirt  # noqa: E402,F401
import psycopg2  # noqa: E402,F401

import taskomatic.runtime.fetcher  # noqa: E402
import taskomatic.runtime.reconciler  # noqa: E402
import taskomatic.runtime.shard  # noqa: E402,F401
from taskomatic.logsetup import set_process_title  # noqa: E402

_PR_SET_PDEATHSIG = 1
_SERVER_PID = os.getpid()
_in_server = True  # False in a child: forks a child makes itself are not the server's


def _die_with_the_server() -> None:
    """In each forked child: SIGKILL when the fork server dies.

    The supervisor learns a child's end from the fork server; if the server
    died, it would count every child dead and start new ones in their slots
    while the old ones ran on: two shards in one slot. Dying with the server
    makes that count true (their tasks are reconciled, as for a killed shard).
    """
    global _in_server
    if not _in_server:
        return
    _in_server = False
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _SERVER_PID:  # the server died before the line above
        os._exit(1)


def free_small_blocks() -> dict[int, int]:
    """Free blocks in the pools of Python's small-object allocator, by size class (bytes): {size: blocks}.

    Read from ``sys._debugmallocstats()``, which prints to the C stderr; an empty dict if its table
    could not be read (it is a diagnostic of CPython's, and its layout may change).
    """
    with tempfile.TemporaryFile() as captured:
        stderr = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
        captured.seek(0)
        table = captured.read().decode("ascii", "replace")
    # "class   size   num pools   blocks in use  avail blocks", one row per size class
    rows = re.finditer(r"^\s*\d+\s+(\d+)\s+\d+\s+\d+\s+(\d+)\s*$", table, re.MULTILINE)
    return {int(row.group(1)): int(row.group(2)) for row in rows}


_BYTES_HEADER = sys.getsizeof(b"")  # a bytes object of length n takes this + n bytes


def fill_free_small_blocks() -> list[object]:
    """Occupy the free blocks the imports left in the allocator's pools; returns the objects, to be kept.

    A child's new objects go first into free blocks of partly used pools. Left free here, those
    blocks are scattered over pages the children share, and each child writing one object into
    a page copies the whole page: measured, ~0.5 MB of unique memory per shard. Filled, a child's
    objects go to pools of its own, packed. The fillers cost the fork server the same ~0.7 MB
    once, shared. Sizes below 32 bytes hold no Python object and are left alone.
    """
    fillers: list[object] = []
    for size, free in free_small_blocks().items():
        if size == 32:  # a two-digit int takes 32 bytes
            fillers.extend((1 << 40) + n for n in range(free))
        elif size > 32:
            fillers.extend(bytes(size - _BYTES_HEADER) for _ in range(free))
    return fillers


os.register_at_fork(after_in_child=_die_with_the_server)
set_process_title("taskomatic: forkserver")
gc.collect()
_FILLERS = fill_free_small_blocks()  # after the collection, which frees what it can
gc.freeze()  # after the imports, in the process that forks
gc.enable()  # children inherit an enabled collector that skips the frozen objects
