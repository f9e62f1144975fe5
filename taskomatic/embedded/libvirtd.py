"""A managed virtualization node: one private ``libvirtd`` in session mode.

Each node is a real daemon running as an unprivileged user, with its own
configuration, sockets, state and ``host_uuid``, so several nodes on one machine
look like distinct hosts (live migration between them works). Layout::

    base_dir/name/
      config/libvirt/libvirtd.conf   unix_sock_dir, auth "none", host_uuid, ...
      config/libvirt/qemu.conf       stdio_handler = "file" (no virtlogd)
      config/ runtime/ cache/ data/  XDG_CONFIG_HOME, XDG_RUNTIME_DIR, XDG_CACHE_HOME,
                                     XDG_DATA_HOME (session mode keeps everything there)
      home/                          HOME
      run/libvirt-sock               the socket clients use (mode 0777)
      libvirtd.log                   daemon stderr

Two drivers sit behind the one socket:

* ``test_uri`` (``test+unix:///default?socket=...``): libvirt's test driver inside
  the daemon, shared by every process that connects. Its state lives in daemon
  memory only while at least one connection is open, so the node keeps one open
  from a small helper process (``keep_test_state``); it is lost when the daemon
  stops, restarts or is killed.
* ``qemu_uri`` (``qemu+unix:///session?socket=...``): real qemu guests (use domain
  type ``qemu``: TCG needs no /dev/kvm access). qemu daemonizes into its own
  session, outside the daemon's process group, and outlives the daemon (as on a
  real host); ``stop()`` destroys and, if need be, kills them, ``kill()`` and
  ``restart()`` leave them running.
"""

from __future__ import annotations

import logging
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import libvirt

from taskomatic.embedded.processes import check_traversable, exited_unreaped, kill_group, proc_state, tail, wait_until

if TYPE_CHECKING:
    from typing import Self  # annotations only: the runtime floor is below 3.11

log = logging.getLogger(__name__)

#: A namespace for host UUIDs derived from a node's directory, so that a node
#: keeps its identity across restarts while two nodes never share one.
HOST_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "taskomatic:managed-node")

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

# Holds one connection to the test driver for the node's lifetime. Reads stdin
# until EOF: when we close the pipe, or when we die, it closes and exits.
_KEEPER_SCRIPT = """\
import sys, libvirt
conn = libvirt.open(sys.argv[1])
sys.stdout.write("ready\\n")
sys.stdout.flush()
sys.stdin.read()
conn.close()
"""


class ManagedNodeError(RuntimeError):
    """The node's libvirtd could not be found, configured, started or reached."""


def _find_libvirtd() -> str:
    path = shutil.which("libvirtd") or shutil.which("libvirtd", path="/usr/sbin:/sbin")
    if path is None:
        raise ManagedNodeError(
            "libvirtd not found on PATH or in /usr/sbin. Install it (Debian: "
            "libvirt-daemon; Fedora: libvirt-daemon libvirt-daemon-driver-qemu)."
        )
    return path


def _is_libvirtd(pid: int) -> bool:
    """Is ``pid`` a live libvirtd? (A stale pid file may name a reused pid.)"""
    if proc_state(pid) != "alive":
        return False
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("libvirtd")
    except OSError:
        return True  # cannot look (another user's process): assume the worst


class ManagedNode:
    """One private libvirtd (session mode) acting as one virtualization host."""

    def __init__(
        self,
        base_dir: str | Path,
        name: str,
        user: str | None = None,
        host_uuid: str | None = None,
        *,
        keep_test_state: bool = True,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.name = name
        self.node_dir = self.base_dir / name
        self.config_home = self.node_dir / "config"
        self.conf_path = self.config_home / "libvirt" / "libvirtd.conf"
        self.qemu_conf_path = self.config_home / "libvirt" / "qemu.conf"
        self.runtime_dir = self.node_dir / "runtime"
        self.cache_home = self.node_dir / "cache"
        self.data_home = self.node_dir / "data"
        self.home = self.node_dir / "home"
        self.socket_dir = self.node_dir / "run"
        self.log_path = self.node_dir / "libvirtd.log"
        self.host_uuid = host_uuid or str(uuid.uuid5(HOST_UUID_NAMESPACE, str(self.node_dir)))
        self.keep_test_state = keep_test_state

        if os.geteuid() == 0:
            pw = pwd.getpwnam(user or "nobody")
            if pw.pw_uid == 0:
                raise ManagedNodeError("refusing to run a session-mode libvirtd as root")
            self._switch = True
        else:
            pw = pwd.getpwuid(os.geteuid())
            if user is not None and user != pw.pw_name:
                raise ManagedNodeError(f"cannot run libvirtd as {user!r}: only root can switch users")
            self._switch = False
        self.user = pw.pw_name
        self._uid, self._gid = pw.pw_uid, pw.pw_gid
        self._groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))

        self._proc: subprocess.Popen[bytes] | None = None
        self._keeper: subprocess.Popen[bytes] | None = None

    # -- public API ---------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / "libvirt-sock"

    @property
    def test_uri(self) -> str:
        return f"test+unix:///default?socket={self.socket_path}"

    @property
    def qemu_uri(self) -> str:
        return f"qemu+unix:///session?socket={self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 30) -> None:
        """Start the daemon and wait until a real libvirt connection works."""
        if self._proc is not None:
            if not exited_unreaped(self._proc):
                return
            self._stop_daemon(0, destroy_guests=False)  # it died: reap it first
        deadline = time.monotonic() + timeout
        self._prepare()
        other = self._daemon_pid_from_file()
        if other is not None and _is_libvirtd(other):
            # Another libvirtd (of an earlier run) still serves this directory; ours
            # would fail on the pid file lock, and its socket would fool ready() below.
            raise ManagedNodeError(
                f"a libvirtd (pid {other}) is already running for node {self.name} in "
                f"{self.node_dir}; stop it first or use another directory"
            )
        args = [_find_libvirtd(), "-f", str(self.conf_path)]
        log.info("starting libvirtd for node %s as %s", self.name, self.user)
        with open(self.log_path, "ab") as logf:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.node_dir,
                env=self._env(),
                # Own session: Ctrl-C in the terminal does not reach it, and its pid
                # names a process group holding only what it spawned.
                start_new_session=True,
                user=self._uid if self._switch else None,
                group=self._gid if self._switch else None,
                extra_groups=[] if self._switch else None,
            )
        self._proc = proc

        def ready() -> bool:
            if exited_unreaped(proc):
                return True  # reported below
            # Only our daemon counts: it writes its pid before it opens the socket.
            return self._daemon_pid_from_file() == proc.pid and self._can_open()

        ok = wait_until(ready, deadline)
        if exited_unreaped(proc):
            self._stop_daemon(0, destroy_guests=False)
            raise ManagedNodeError(f"libvirtd for node {self.name} exited during startup:\n{tail(self.log_path)}")
        if not ok:
            self._stop_daemon(5, destroy_guests=False)
            raise ManagedNodeError(
                f"libvirtd for node {self.name} not reachable at {self.socket_path} "
                f"within {timeout}s:\n{tail(self.log_path)}"
            )
        if self.keep_test_state:
            self._start_keeper(deadline)
        log.info("node %s ready: libvirtd pid %d", self.name, proc.pid)

    def stop(self, timeout: float = 15) -> None:
        """Destroy the node's guests and stop its daemon. Idempotent."""
        deadline = time.monotonic() + timeout
        self._stop_daemon(timeout, destroy_guests=True)
        # Guests that the daemon could not destroy (it was killed, hung, or had
        # lost track of them) are in sessions of their own: find them by owner,
        # executable and a path of this node on their command line.
        leftovers = self.guest_pids()
        for pid in leftovers:
            log.warning("node %s: killing leftover qemu pid %d", self.name, pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Wait for them to be gone, not just unlisted: a dying process loses its command
        # line before it has exited.
        def all_gone() -> bool:
            return not self.guest_pids() and all(proc_state(pid) != "alive" for pid in leftovers)

        if not wait_until(all_gone, max(deadline, time.monotonic() + 5)):
            raise ManagedNodeError(f"node {self.name}: qemu pids {self.guest_pids() or leftovers} survived SIGKILL")

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would (fault tests). Guests keep running."""
        self._stop_keeper()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        log.info("node %s: killing libvirtd pid %d", self.name, proc.pid)
        kill_group(proc)
        proc.wait()

    def freeze(self) -> None:
        """SIGSTOP the daemon (fault tests): every call to it hangs until ``thaw()``.

        Its socket still accepts connections (the kernel queues them), so a client
        sees a node that stops answering, not one that is gone.
        """
        if self._proc is not None and not exited_unreaped(self._proc):
            log.info("node %s: freezing libvirtd pid %d", self.name, self._proc.pid)
            os.kill(self._proc.pid, signal.SIGSTOP)  # unreaped, so the pid is still ours

    def thaw(self) -> None:
        """SIGCONT the daemon after ``freeze()`` (harmless if it was not frozen)."""
        if self._proc is not None and not exited_unreaped(self._proc):
            os.kill(self._proc.pid, signal.SIGCONT)

    def restart(self, timeout: float = 30) -> None:
        """Graceful daemon restart; running guests are kept and reattached."""
        self._stop_daemon(timeout, destroy_guests=False)
        self.start(timeout)

    def guest_pids(self) -> list[int]:
        """Pids of this node's live qemu processes, with or without a daemon.

        Matched by owner, executable and a path of this node on the command line
        (libvirt puts each domain's master key under the node's config dir), so
        never another node's guests or anyone else's processes.
        """
        marker = (str(self.node_dir) + "/").encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                if os.stat(f"/proc/{pid}").st_uid != self._uid:
                    continue
                if not os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("qemu"):
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue  # gone meanwhile, a zombie (no exe), or not ours to read
            if marker in cmdline and proc_state(pid) == "alive":
                pids.append(pid)
        return pids

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------

    def _env(self) -> dict[str, str]:
        # A fresh environment: session-mode libvirtd derives every path from
        # these, and nothing of the caller's (root's) environment should leak in.
        return {
            "PATH": os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin",
            "LANG": "C",
            "HOME": str(self.home),
            "USER": self.user,
            "LOGNAME": self.user,
            "XDG_CONFIG_HOME": str(self.config_home),
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_CACHE_HOME": str(self.cache_home),
            "XDG_DATA_HOME": str(self.data_home),
        }

    def _prepare(self) -> None:
        if len(str(self.socket_path)) > _MAX_SOCKET_PATH:
            raise ManagedNodeError(
                f"socket path {self.socket_path} is longer than {_MAX_SOCKET_PATH} "
                "bytes, the limit for unix sockets; use a shorter base_dir"
            )
        check_traversable(self.node_dir, self.user, self._uid, self._groups, program="libvirtd", error=ManagedNodeError)
        for directory, mode in (
            (self.node_dir, 0o755),
            (self.config_home / "libvirt", 0o755),
            (self.cache_home, 0o755),
            (self.data_home, 0o755),
            (self.home, 0o755),
            # Clients (possibly other users) must reach the socket...
            (self.socket_dir, 0o755),
            # ...while XDG_RUNTIME_DIR is private by specification.
            (self.runtime_dir, 0o700),
        ):
            directory.mkdir(mode=mode, parents=True, exist_ok=True)
            os.chmod(directory, mode)
        self.conf_path.write_text(
            "# Written by taskomatic.embedded.libvirtd; rewritten at every start.\n"
            f'unix_sock_dir = "{self.socket_dir}"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            # 0777 so that clients running as any user, root included, connect.
            'unix_sock_rw_perms = "0777"\n'
            f'host_uuid = "{self.host_uuid}"\n'
            # Explicit, so a journald-equipped host does not take the logs away.
            'log_outputs = "3:stderr"\n'
            # Fencing a frozen client (README, "Multihost deployment"): a client with keepalive that
            # stops answering (SIGSTOP, a paused VM) loses its connection after about
            # interval x (count + 1) = 2 s, so a call it had not sent yet when it froze fails
            # when it thaws, instead of changing the node after its partitions moved. Clients
            # without keepalive (no event loop) are never probed.
            'keepalive_interval = 1\n'
            'keepalive_count = 1\n'
        )
        self.qemu_conf_path.write_text(
            "# Written by taskomatic.embedded.libvirtd; rewritten at every start.\n"
            # qemu's stdout/stderr straight to a file: no virtlogd to spawn and stop.
            'stdio_handler = "file"\n'
        )
        self.log_path.touch(exist_ok=True)
        if self._switch:
            self._chown_tree()

    def _chown_tree(self) -> None:
        # The whole node directory is private to this node, so hand all of it
        # (including state a run as another user may have left) to the run-as user.
        os.chown(self.node_dir, self._uid, self._gid, follow_symlinks=False)
        for root, dirs, files in os.walk(self.node_dir):
            for entry in dirs + files:
                os.chown(os.path.join(root, entry), self._uid, self._gid, follow_symlinks=False)

    def _daemon_pid_from_file(self) -> int | None:
        try:
            text = (self.runtime_dir / "libvirt" / "libvirtd.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _can_open(self) -> bool:
        # A plain socket connect first: libvirt.open() on a missing socket would
        # print an error on stderr through libvirt's default error handler.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket_path))
            except OSError:
                return False
        try:
            conn = libvirt.open(self.test_uri)
        except libvirt.libvirtError:
            return False
        conn.close()
        return True

    def _start_keeper(self, deadline: float) -> None:
        with open(self.log_path, "ab") as logf:
            keeper = subprocess.Popen(
                [sys.executable, "-c", _KEEPER_SCRIPT, self.test_uri],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=logf,
                start_new_session=True,  # no Ctrl-C traceback from it
            )
        self._keeper = keeper
        stdout = keeper.stdout
        assert stdout is not None  # stdout=PIPE
        ready, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready or stdout.readline() != b"ready\n":
            self._stop_keeper()
            raise ManagedNodeError(f"node {self.name}: the test-driver keeper did not connect:\n{tail(self.log_path)}")

    def _stop_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        try:
            keeper.communicate(timeout=5)  # closes its stdin: it disconnects and exits
        except subprocess.TimeoutExpired:
            keeper.kill()
            keeper.wait()

    def _destroy_guests(self) -> None:
        try:
            conn = libvirt.open(self.qemu_uri)
        except libvirt.libvirtError as e:
            log.warning("node %s: cannot connect to destroy guests: %s", self.name, e)
            return
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                log.info("node %s: destroying guest %s", self.name, dom.name())
                try:
                    dom.destroy()
                except libvirt.libvirtError as e:
                    log.warning("node %s: destroy %s failed: %s", self.name, dom.name(), e)
        finally:
            conn.close()

    def _stop_daemon(self, timeout: float, destroy_guests: bool) -> None:
        self._stop_keeper()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        deadline = time.monotonic() + timeout
        if not exited_unreaped(proc):
            os.kill(proc.pid, signal.SIGCONT)  # a frozen daemon would answer nothing, SIGTERM included
            if destroy_guests:
                self._destroy_guests()
            log.info("node %s: stopping libvirtd pid %d", self.name, proc.pid)
            os.kill(proc.pid, signal.SIGTERM)  # unreaped, so the pid is still ours
            if not wait_until(lambda: exited_unreaped(proc), deadline):
                log.warning("node %s: libvirtd pid %d ignored SIGTERM; killing", self.name, proc.pid)
        # Sweep the group (ours alone: own session, leader not yet reaped), for
        # anything the daemon left behind in it or a daemon that did not exit.
        kill_group(proc)
        proc.wait()


__all__ = ["HOST_UUID_NAMESPACE", "ManagedNode", "ManagedNodeError"]
