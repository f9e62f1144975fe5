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


# pymalloc's table in sys._debugmallocstats(): a header, then one row per size class in use.
_TABLE_HEADER = re.compile(r"^class[ \t]+size[ \t]+num pools[ \t]+blocks in use[ \t]+avail blocks[ \t]*$", re.MULTILINE)
_TABLE_ROW = re.compile(r"^[ \t]*\d+[ \t]+(\d+)[ \t]+(\d+)[ \t]+\d+[ \t]+(\d+)[ \t]*$", re.MULTILINE)
_POOL_BYTES = 16 * 1024  # CPython 3.11-3.13 (a larger pool only makes the bound below looser)
_FILL_LIMIT_BYTES = 4 * 1024 * 1024  # ~0.7 MB after our imports; more means the table was misread


def free_small_blocks() -> dict[int, int]:
    """Free blocks in the pools of Python's small-object allocator, by size class (bytes): {size: blocks}.

    Read from ``sys._debugmallocstats()``, which prints to the C stderr (captured in a memfd: no
    file system needed). Empty if the table is absent (another allocator: PYTHONMALLOC=malloc,
    mimalloc) or does not read as expected, since it is a diagnostic whose layout may change.
    """
    try:
        captured = os.memfd_create("mallocstats")
    except (AttributeError, OSError):
        return {}
    stderr = -1
    try:
        stderr = os.dup(2)
        os.dup2(captured, 2)
        sys._debugmallocstats()
    except (AttributeError, OSError):
        return {}
    finally:
        if stderr >= 0:
            os.dup2(stderr, 2)
            os.close(stderr)
        os.lseek(captured, 0, os.SEEK_SET)
        table = b"".join(iter(lambda: os.read(captured, 65536), b"")).decode("ascii", "replace")
        os.close(captured)
    header = _TABLE_HEADER.search(table)
    if header is None:
        return {}
    free: dict[int, int] = {}
    for row in _TABLE_ROW.finditer(table, header.end()):
        size, pools, blocks = int(row.group(1)), int(row.group(2)), int(row.group(3))
        if size % 16 or not 16 <= size <= 512 or blocks > pools * (_POOL_BYTES // size):
            return {}
        free[size] = blocks
    return free


_BYTES_HEADER = sys.getsizeof(b"")  # a bytes object of length n asks for this + n bytes


def _plain_allocator() -> bool:
    """pymalloc without debug hooks (which add bytes to every block, so sizes would land a class higher)."""
    return (not sys.flags.dev_mode and not hasattr(sys, "gettotalrefcount")
            and os.environ.get("PYTHONMALLOC", "pymalloc") == "pymalloc")


def fill_free_small_blocks() -> list[object]:
    """Occupy the free blocks the imports left in the allocator's pools; returns the objects, to be kept.

    A child's new objects go first into free blocks of partly used pools. Left free here, those
    blocks are scattered over pages the children share, and each child writing one object into
    a page copies the whole page: measured, ~0.5 MB of unique memory per shard. Filled, a child's
    objects go to pools of its own, packed. The fillers cost the fork server ~0.7 MB, once, shared.
    The 16-byte class holds no Python object and is left alone. Nothing is filled when the table
    cannot be read or the allocator is not plain pymalloc.
    """
    free = free_small_blocks() if _plain_allocator() else {}
    if sum(size * blocks for size, blocks in free.items()) > _FILL_LIMIT_BYTES:
        return []
    # The list is sized first and filled by plain loops, so that no other object (a growing
    # list, a generator) takes a free block between reading the table and filling it.
    fillers: list[object] = [None] * sum(blocks for size, blocks in free.items() if size >= 32)
    at = 0
    for size, blocks in free.items():
        if size < 32:
            continue
        for n in range(blocks):
            # a one-digit int sum is given two digits' room, 32 bytes (floats would come from their free list)
            fillers[at] = (1 << 20) + n if size == 32 else bytes(size - _BYTES_HEADER)
            at += 1
    return fillers


def _fill_or_nothing() -> list[object]:
    """The fill is an optimisation: whatever goes wrong, the fork server must still start children."""
    try:
        return fill_free_small_blocks()
    except Exception:
        return []


os.register_at_fork(after_in_child=_die_with_the_server)
set_process_title("taskomatic: forkserver")
gc.collect()
_FILLERS = _fill_or_nothing()  # after the collection, which frees what it can
gc.freeze()  # after the imports, in the process that forks
gc.enable()  # children inherit an enabled collector that skips the frozen objects
