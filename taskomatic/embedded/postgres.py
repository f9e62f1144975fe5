"""A private PostgreSQL server under one directory, for tests, the demo and benchmarks.

Layout under ``base_dir``::

    base_dir/
      pgdata/         data directory (initdb'd on first start, mode 0700)
      run/            unix socket directory (no TCP listener at all)
      postgres.log    server stdout/stderr

PostgreSQL refuses to run as root, so when this process is root the server (and
initdb) run as an unprivileged user, switched to directly by ``subprocess.Popen``
(``user=``/``group=``/``extra_groups=[]``) rather than through ``runuser``.

The postmaster runs in its own session (``start_new_session=True``): a Ctrl-C in
the terminal goes to the foreground process group only, so the server is not
killed under us; we stop it ourselves with a fast shutdown.

Usage::

    with EmbeddedPostgres("/var/tmp/tm-pg") as pg:
        conn = psycopg2.connect(pg.dsn)
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import psycopg2
import psycopg2.errors

from taskomatic.db.server import ensure_database
from taskomatic.embedded.processes import check_traversable, exited_unreaped, kill_group, proc_state, tail, wait_until

if TYPE_CHECKING:
    from typing import Self  # annotations only: the runtime floor is below 3.11

log = logging.getLogger(__name__)

SUPERUSER = "taskomatic"
DATABASE = "taskomatic"

#: Where distributions put versioned server binaries that are not on PATH
#: (Debian/Ubuntu, then the PGDG RPMs).
DEFAULT_SEARCH_PATTERNS: tuple[str, ...] = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
)

_BINARIES = ("initdb", "postgres", "pg_ctl")


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be located, initialised, started or reached."""


@dataclass(frozen=True)
class PgBinaries:
    initdb: str
    postgres: str
    pg_ctl: str


def _version_key(path: str) -> tuple[int, ...]:
    # "/usr/lib/postgresql/15/bin" or "/usr/pgsql-9.6/bin": compare numerically,
    # so that 10 sorts above 9.6.
    return tuple(int(n) for n in re.findall(r"\d+", path))


def find_pg_binaries(
    path: str | None = None,
    patterns: Sequence[str] = DEFAULT_SEARCH_PATTERNS,
) -> PgBinaries:
    """Find ``initdb``, ``postgres`` and ``pg_ctl``.

    PATH wins (the operator chose it); otherwise the highest-version directory
    matching ``patterns`` that holds all three. ``path`` overrides ``$PATH``.
    """
    found = {name: shutil.which(name, path=path) for name in _BINARIES}
    if all(found.values()):
        return PgBinaries(**{k: str(v) for k, v in found.items()})

    candidates: list[str] = []
    for pattern in patterns:
        candidates.extend(glob.glob(pattern))
    # Take the three binaries from one directory, never mix versions.
    for bindir in sorted(candidates, key=_version_key, reverse=True):
        paths = {name: os.path.join(bindir, name) for name in _BINARIES}
        if all(os.access(p, os.X_OK) for p in paths.values()):
            return PgBinaries(**paths)

    raise EmbeddedPostgresError(
        "PostgreSQL server binaries not found: looked for "
        f"{', '.join(_BINARIES)} on PATH and in {', '.join(patterns) or '(no directories)'}. "
        "Install the PostgreSQL server package (Debian: postgresql, Fedora: "
        "postgresql-server) or put its bin directory on PATH."
    )


@dataclass(frozen=True)
class _RunAs:
    """The OS identity the server runs as; ``switch`` is False when we already are it."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    switch: bool

    # Arguments for subprocess: None means "do not switch". extra_groups=[]
    # drops root's supplementary groups as well.
    @property
    def popen_user(self) -> int | None:
        return self.uid if self.switch else None

    @property
    def popen_group(self) -> int | None:
        return self.gid if self.switch else None

    @property
    def popen_extra_groups(self) -> list[int] | None:
        return [] if self.switch else None


def _resolve_user(user: str | None) -> _RunAs:
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        if user is not None and user != me.pw_name:
            raise EmbeddedPostgresError(
                f"cannot run PostgreSQL as {user!r}: only root can switch users (current user is {me.pw_name!r})"
            )
        return _RunAs(me.pw_name, me.pw_uid, me.pw_gid, tuple(os.getgroups()), False)
    if user is None:
        try:
            pwd.getpwnam("postgres")
            user = "postgres"
        except KeyError:
            user = "nobody"
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise EmbeddedPostgresError(f"run-as user {user!r} does not exist") from None
    if pw.pw_uid == 0:
        raise EmbeddedPostgresError("PostgreSQL cannot run as root; choose an unprivileged user")
    groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    return _RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid, groups, True)


def _proc_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _pids_with_cwd(directory: Path) -> list[int]:
    """Live processes whose working directory is ``directory`` (readable ones)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _proc_cwd(int(entry)) == directory:
            pids.append(int(entry))
    return pids


class EmbeddedPostgres:
    """A private PostgreSQL server (unix socket only) under ``base_dir``."""

    def __init__(self, base_dir: str | Path, user: str | None = None, port: int = 5432) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "pgdata"
        self.socket_dir = self.base_dir / "run"
        self.log_path = self.base_dir / "postgres.log"
        self.port = port
        self._run_as = _resolve_user(user)
        self.user = self._run_as.name
        self._binaries: PgBinaries | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reused_pid: int | None = None
        #: True while the running server is one this object launched (and will stop).
        self.started_by_us = False

    # -- public API ---------------------------------------------------------

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={self.port} dbname={DATABASE} user={SUPERUSER}"

    @property
    def pid(self) -> int | None:
        """The postmaster pid, whether we started it or reused it; None when stopped."""
        if self._proc is not None:
            return self._proc.pid
        return self._reused_pid

    @property
    def binaries(self) -> PgBinaries:
        if self._binaries is None:
            self._binaries = find_pg_binaries()
        return self._binaries

    def start(self, timeout: float = 60) -> None:
        """Initialise if needed, start (or reuse) the server, create the database."""
        if self._proc is not None:
            if not exited_unreaped(self._proc):
                return
            self.stop()  # it crashed: reap it and sweep its orphans first
        deadline = time.monotonic() + timeout
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(deadline)

        existing = self._running_postmaster(deadline)
        if existing is not None:
            if not wait_until(lambda: self._can_connect("postgres"), deadline):
                raise EmbeddedPostgresError(
                    f"a postmaster (pid {existing}) holds {self.data_dir} but does not "
                    f"answer on {self.socket_dir} port {self.port} within {timeout}s"
                )
            log.info("reusing PostgreSQL pid %d on %s", existing, self.data_dir)
            self._reused_pid = existing
            self.started_by_us = False
        else:
            self._launch(deadline)
        self._ensure_database()

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown of a server we started; a reused one is left running."""
        if self._proc is None:
            if self._reused_pid is not None:
                log.info("not stopping PostgreSQL pid %d: it was running before us", self._reused_pid)
            self._reused_pid = None
            return
        proc, self._proc = self._proc, None
        self.started_by_us = False
        deadline = time.monotonic() + timeout
        crashed = exited_unreaped(proc)
        if not crashed:
            # SIGINT = "fast" shutdown: abort sessions, checkpoint, exit. The
            # postmaster is in its own session so only we ever send it this.
            log.info("stopping PostgreSQL pid %d", proc.pid)
            os.kill(proc.pid, signal.SIGINT)  # unreaped, so the pid is still ours
        clean = wait_until(lambda: exited_unreaped(proc), deadline) and not crashed
        if not clean:
            # After a crash its backends may be orphans in the group we created
            # (nobody else is in it); after a timeout, the postmaster too.
            log.warning("PostgreSQL pid %d did not shut down cleanly; killing its process group", proc.pid)
            kill_group(proc)
        proc.wait()

    def restart(self, timeout: float = 60) -> None:
        self.stop()
        self.start(timeout)

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

    def _child_env(self) -> dict[str, str]:
        # PG* variables from the caller (PGDATA, PGHOST, ...) would redirect the
        # tools away from our private cluster; a C locale avoids "setlocale" noise
        # for users whose environment names a locale that is not installed.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if self._run_as.switch:
            env["HOME"] = str(self.base_dir)
            env["USER"] = env["LOGNAME"] = self._run_as.name
        return env

    def _prepare_dirs(self) -> None:
        who = self._run_as
        check_traversable(
            self.base_dir, who.name, who.uid, who.groups, program="the server", error=EmbeddedPostgresError
        )
        self.base_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        for directory, mode in ((self.data_dir, 0o700), (self.socket_dir, 0o755)):
            directory.mkdir(mode=mode, exist_ok=True)
            st = directory.stat()
            if st.st_uid != self._run_as.uid:
                if not self._run_as.switch:
                    raise EmbeddedPostgresError(f"{directory} is owned by uid {st.st_uid}, not by us")
                if directory == self.data_dir and any(directory.iterdir()):
                    # Silently re-owning a cluster made by another user could hide a
                    # configuration mistake; make it explicit.
                    raise EmbeddedPostgresError(
                        f"{directory} belongs to uid {st.st_uid}, not to run-as user "
                        f"{self._run_as.name!r}; pass user= matching it or use another base_dir"
                    )
                os.chown(directory, self._run_as.uid, self._run_as.gid)
            # The server refuses a data directory readable by others.
            os.chmod(directory, mode)
        self.log_path.touch(exist_ok=True)
        if self._run_as.switch:
            os.chown(self.log_path, self._run_as.uid, self._run_as.gid)

    def _initdb(self, deadline: float) -> None:
        args = [
            self.binaries.initdb,
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]
        help_text = subprocess.run([self.binaries.initdb, "--help"], capture_output=True, text=True, check=False).stdout
        if "--no-instructions" in help_text:  # PostgreSQL >= 14
            args.append("--no-instructions")
        log.info("initdb %s as %s", self.data_dir, self._run_as.name)
        with open(self.log_path, "ab") as logf:
            try:
                result = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    cwd=self.base_dir,
                    env=self._child_env(),
                    timeout=max(1.0, deadline - time.monotonic()),
                    check=False,
                    user=self._run_as.popen_user,
                    group=self._run_as.popen_group,
                    extra_groups=self._run_as.popen_extra_groups,
                )
            except subprocess.TimeoutExpired:
                raise EmbeddedPostgresError(f"initdb timed out; see {self.log_path}") from None
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed with exit code {result.returncode}:\n{tail(self.log_path)}")

    def _read_postmaster_pid(self) -> list[str] | None:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None

    def _running_postmaster(self, deadline: float) -> int | None:
        """The pid of a live postmaster serving our data dir, or None.

        postmaster.pid alone cannot tell: after a crash its pid may be dead (then
        postgres discards the file itself, after checking that no old backend is
        still attached to the old shared memory), a zombie nobody reaped yet, or
        reused by an unrelated process (common in containers, where pids are
        small); postgres refuses to start in the last two cases. We identify the
        postmaster by its working directory (it chdir()s into the data dir).
        """
        lines = self._read_postmaster_pid()
        if not lines or not lines[0].strip().isdigit():
            return None
        pid = int(lines[0])
        state = proc_state(pid)
        if state == "alive":
            cwd = _proc_cwd(pid)
            if cwd is None or cwd == self.data_dir.resolve():  # None: cannot tell, trust it
                if len(lines) >= 5 and (lines[3].strip() != str(self.port) or lines[4].strip() != str(self.socket_dir)):
                    raise EmbeddedPostgresError(
                        f"a postmaster (pid {pid}) already runs on {self.data_dir} with port "
                        f"{lines[3].strip()} and socket directory {lines[4].strip()}, not port "
                        f"{self.port} in {self.socket_dir}; stop it or use the same settings"
                    )
                return pid
        if state == "gone":
            return None  # postgres handles this case itself, with its shared memory check
        # Removing the lock file skips postgres's own check for backends of the
        # dead server that are still running, so do that check here: each of
        # them has its cwd in the data dir. They exit soon after the postmaster.
        data_dir = self.data_dir.resolve()
        if not wait_until(lambda: not _pids_with_cwd(data_dir), deadline):
            raise EmbeddedPostgresError(
                f"processes {_pids_with_cwd(data_dir)} still run in {self.data_dir} "
                "(backends of a crashed server?); stop them before starting a new one"
            )
        log.warning(
            "removing stale postmaster.pid: pid %d is %s",
            pid,
            "a zombie" if state == "zombie" else "an unrelated process",
        )
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        (self.socket_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)
        return None

    def _launch(self, deadline: float) -> None:
        args = [
            self.binaries.postgres,
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=",
            "-c",
            f"unix_socket_directories={self.socket_dir}",
            "-c",
            "max_connections=200",
        ]
        log.info("starting PostgreSQL on %s as %s", self.socket_dir, self._run_as.name)
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=self._child_env(),
                # Own session: terminal signals (Ctrl-C) do not reach it, and its
                # pid is the process group we may sweep with SIGKILL at stop().
                start_new_session=True,
                user=self._run_as.popen_user,
                group=self._run_as.popen_group,
                extra_groups=self._run_as.popen_extra_groups,
            )
        self.started_by_us = True
        self._reused_pid = None
        proc = self._proc

        def ready() -> bool:
            if exited_unreaped(proc):
                return True  # reported below
            return self._can_connect("postgres")

        ok = wait_until(ready, deadline)
        if exited_unreaped(proc):
            kill_group(proc)
            proc.wait()
            self._proc = None
            self.started_by_us = False
            raise EmbeddedPostgresError(
                f"PostgreSQL exited with code {proc.returncode} during startup:\n{tail(self.log_path)}"
            )
        if not ok:
            self.stop()
            raise EmbeddedPostgresError(f"PostgreSQL not ready before the deadline:\n{tail(self.log_path)}")
        log.info("PostgreSQL pid %d ready", proc.pid)

    def _connect(self, dbname: str) -> psycopg2.extensions.connection:
        return psycopg2.connect(
            host=str(self.socket_dir), port=self.port, dbname=dbname, user=SUPERUSER, connect_timeout=5
        )

    def _can_connect(self, dbname: str) -> bool:
        try:
            conn = self._connect(dbname)
        except psycopg2.OperationalError:
            return False
        conn.close()
        return True

    def _ensure_database(self) -> None:
        conn = self._connect("postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            ensure_database(conn, DATABASE)
        finally:
            conn.close()


__all__ = [
    "DATABASE",
    "SUPERUSER",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "PgBinaries",
    "find_pg_binaries",
]
