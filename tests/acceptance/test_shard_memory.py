"""Children forked from the preloaded fork server: little unique memory per shard, nothing inherited.

Measured (bench.shard_memory, bench/RESULTS.md): a spawned shard has ~20 MB of unique memory (USS),
a forkserver one ~7.5 MB; the bound below sits between them, generous for the new way and well
under the old one.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.helpers import wait_for

SHARDS = 4
SHARD_USS_BOUND_KB = 14 * 1024


def _session(pid: int) -> dict[int, str]:
    """{pid: title} of every process of the daemon's session (it leads one), the supervisor included."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--sid", str(pid)], capture_output=True, text=True,
                         check=False).stdout
    found = {}
    for line in out.splitlines():
        p, _, title = line.strip().partition(" ")
        found[int(p)] = title
    return found


def _uss_kb(pid: int) -> int:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1])
    return fields["Private_Clean"] + fields["Private_Dirty"]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes


def _all_up(daemon: Any, shards: int = SHARDS) -> dict[int, str]:
    """The session once every shard, the fetcher and the reconciler have their titles (imports done)."""
    def up() -> dict[int, str] | None:
        titles = _session(daemon.pid)
        shards_up = [t for t in titles.values() if t.startswith("taskomatic: shard")]
        roles_up = any(t.startswith("taskomatic: reconciler") for t in titles.values())
        return titles if len(shards_up) == shards and roles_up else None

    return wait_for(up, 60, 0.1, "every child to be up")


def test_each_shard_has_little_unique_memory(daemon_factory: Any) -> None:
    daemon = daemon_factory(shards=SHARDS)
    titles = _all_up(daemon)
    assert any(t == "taskomatic: forkserver" for t in titles.values()), titles
    shards = [pid for pid, t in titles.items() if t.startswith("taskomatic: shard")]
    # A shard's connections are open once it is up; its USS does not grow while idle.
    uss = {pid: _uss_kb(pid) for pid in shards}
    assert all(kb < SHARD_USS_BOUND_KB for kb in uss.values()), \
        f"shard USS (kB) {uss}, bound {SHARD_USS_BOUND_KB}: are the children still spawned?"


def test_no_child_shares_a_socket_with_the_supervisor(daemon_factory: Any) -> None:
    daemon = daemon_factory(shards=SHARDS)
    titles = _all_up(daemon)
    supervisor_sockets = _socket_inodes(daemon.pid)
    assert supervisor_sockets, "the supervisor holds its guard connection to PostgreSQL"
    forkserver = next(pid for pid, t in titles.items() if t == "taskomatic: forkserver")
    # The fork server forks every child: it must never have started a thread.
    assert os.listdir(f"/proc/{forkserver}/task") == [str(forkserver)]
    for pid, title in titles.items():
        if pid != daemon.pid:
            shared = _socket_inodes(pid) & supervisor_sockets
            assert not shared, f"{title} (pid {pid}) inherited the supervisor's sockets {shared}"


def test_spawn_stays_selectable(daemon_factory: Any) -> None:
    daemon = daemon_factory(shards=1, extra=["--set", "child_start=spawn"])
    titles = _all_up(daemon, shards=1)
    assert "taskomatic: forkserver" not in titles.values(), titles
    shard = next(pid for pid, t in titles.items() if t.startswith("taskomatic: shard"))
    assert int(Path(f"/proc/{shard}/stat").read_text().rsplit(")", 1)[1].split()[1]) == daemon.pid, \
        "a spawned shard is the supervisor's own child"


def test_children_die_with_a_killed_fork_server_and_each_slot_is_refilled_once(daemon_factory: Any) -> None:
    daemon = daemon_factory(shards=SHARDS)
    titles = _all_up(daemon)
    forkserver = next(pid for pid, t in titles.items() if t == "taskomatic: forkserver")
    children = {pid for pid, t in titles.items() if t.startswith(("taskomatic: shard", "taskomatic: fetcher"))}
    os.kill(forkserver, signal.SIGKILL)
    # Without the death signal the old children would run on beside their replacements.
    wait_for(lambda: not any(_alive(pid) for pid in children), 30, 0.1, "the old children to die with the fork server")

    def refilled() -> dict[int, str] | None:
        now = _session(daemon.pid)
        shards = sorted(t for p, t in now.items() if t.startswith("taskomatic: shard") and p not in children)
        return now if shards == [f"taskomatic: shard {n}/{SHARDS}" for n in range(SHARDS)] else None

    now = wait_for(refilled, 60, 0.1, "a new shard in every slot")
    assert not [pid for pid in children if _alive(pid)], "an old child still runs"
    assert sum(t.startswith("taskomatic: shard") for p, t in now.items() if _alive(p)) == SHARDS, now
    assert daemon.process.poll() is None, daemon.log()[-3000:]


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its new parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
