"""Process and filesystem helpers shared by the embedded servers.

Both ``EmbeddedPostgres`` and ``ManagedNode`` start a daemon as a child in its
own session (so its pid is also its process group id), possibly as another,
unprivileged user. These helpers check that such a user can reach a directory,
inspect processes through ``/proc``, wait with a deadline, kill a child's
process group safely and quote the end of a log in error messages.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def can_search(st: os.stat_result, uid: int, groups: Sequence[int]) -> bool:
    """May ``uid`` (with supplementary ``groups``) search the directory ``st`` describes?"""
    # Same order as the kernel: owner bits, else group bits, else other bits
    # (the first class that matches decides, even if it is the most restrictive).
    # ACLs are ignored; they can only make this check pessimistic.
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def check_traversable(
    path: Path,
    user: str,
    uid: int,
    groups: Sequence[int],
    *,
    program: str,
    error: Callable[[str], Exception],
) -> None:
    """Raise ``error(message)`` unless ``user`` can reach ``path`` through every existing ancestor.

    ``program`` names what would fail to reach it ("the server", "libvirtd"),
    for the message. Checking up front turns a daemon's obscure "permission
    denied" at startup into an error that names the directory to fix.
    """
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            return  # the caller creates the rest, with permissive modes
        if not can_search(st, uid, groups):
            raise error(
                f"user {user!r} cannot traverse {directory} "
                f"(mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}), so "
                f"{program} could not reach {path}. Use a directory it can reach, "
                "for example one under /var/tmp or /tmp made with mode 0755."
            )


def proc_state(pid: int) -> str:
    """ "alive", "zombie" (exited, not reaped by its parent) or "gone"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The command name (field 2) may contain spaces and ")": the state
            # is the first field after the last ")".
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    return "zombie" if fields[0] in (b"Z", b"X") else "alive"


def exited_unreaped(proc: subprocess.Popen[bytes]) -> bool:
    """Has our child exited? Peeks without reaping (WNOWAIT).

    While an exited child is not reaped its pid stays reserved, so its process
    group id cannot be handed to anyone else: killpg() on it is then safe.
    """
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group led by our child ``proc`` (own session, so only ours).

    Only while the leader is unreaped: a reaped pid could be reused.
    """
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_until(predicate: Callable[[], bool], deadline: float) -> bool:
    """Poll ``predicate`` with a short backoff until it holds or ``deadline`` passes.

    ``deadline`` is a ``time.monotonic()`` value. ``predicate`` is tried at least
    once (so a deadline already past still checks) and last at about the deadline.
    """
    delay = 0.01
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        # Never sleep past the deadline; back off so long waits do not spin.
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.2)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of the log at ``path``, for error messages."""
    try:
        with open(path, "rb") as f:
            # Only the last 8 KiB: logs may be large, and a few lines suffice.
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


__all__ = [
    "can_search",
    "check_traversable",
    "exited_unreaped",
    "kill_group",
    "proc_state",
    "tail",
    "wait_until",
]
