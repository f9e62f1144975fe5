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

import gc

# Collections during the imports would free objects and leave holes in pages
# the children then share half-used; collect once, at the end, instead.
gc.disable()

import libvirt  # noqa: E402,F401
import psycopg2  # noqa: E402,F401

import taskomatic.runtime.fetcher  # noqa: E402
import taskomatic.runtime.reconciler  # noqa: E402
import taskomatic.runtime.shard  # noqa: E402,F401
from taskomatic.logsetup import set_process_title  # noqa: E402

set_process_title("taskomatic: forkserver")
gc.collect()
gc.freeze()  # after the imports, in the process that forks
gc.enable()  # children inherit an enabled collector that skips the frozen objects
