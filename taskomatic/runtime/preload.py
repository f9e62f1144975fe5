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
import signal

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


os.register_at_fork(after_in_child=_die_with_the_server)
set_process_title("taskomatic: forkserver")
gc.collect()
gc.freeze()  # after the imports, in the process that forks
gc.enable()  # children inherit an enabled collector that skips the frozen objects
