"""The set-up every benchmark shares: a private PostgreSQL, databases, the daemons, and what runs around them.

:class:`Harness` is one benchmark's private world: a work directory under
/tmp, one :class:`~taskomatic.embedded.postgres.EmbeddedPostgres` (unix
socket, fsync on), optionally a migrated template database, the machine's
description, the bench plugin's dist-info, SIGTERM turned into
:class:`Interrupted` (and Ctrl-C into KeyboardInterrupt even under nohup),
and the runners and libvirt nodes it started. Leaving it stops every runner
and node still running, PostgreSQL, restores the signal handlers and removes
the work directory (unless kept).

Besides: fresh databases (a copy of the template, or migrated from scratch),
queueing tasks in one INSERT, the resolved daemon settings, and
:class:`CpuWindow`, the CPU of the daemons, PostgreSQL, the nodes, the bench
and the whole machine between two moments (see :mod:`bench.measure`).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg2

from bench import lifecycle, measure
from bench.plugin import write_dist_info
from bench.runners import REPO, Runner, RunnerFailed, RunnerSpec
from bench.workloads import PlannedTask

RESULTS_DIR = REPO / "bench" / "results"
TEMPLATE_DB = "bench_template"
MULTIHOST = "daemon.mode=multihost"  # what `--mode multihost` sets (cli.resolve_config: the same override)


class Interrupted(Exception):
    """SIGTERM to the bench: clean up as on Ctrl-C."""


# -- the machine ---------------------------------------------------------------------


def _first(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip() if ":" in line else line.split("=", 1)[1].strip()
    except OSError:
        return None
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine_description(conn: Any) -> dict[str, Any]:
    """CPU, cores, memory, kernel, OS, Python, PostgreSQL with its settings, psycopg2, the commit."""
    from taskomatic import __version__

    mem = _first("/proc/meminfo", "MemTotal")
    with conn.cursor() as cur:
        settings = {}
        for setting in ("server_version", "fsync", "synchronous_commit", "shared_buffers", "max_connections"):
            cur.execute(f"SHOW {setting}")
            settings[setting] = cur.fetchone()[0]
    conn.rollback()
    os_name = _first("/etc/os-release", "PRETTY_NAME=")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_model": _first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_kb": int(mem.split()[0]) if mem else None,
        "kernel": platform.release(),
        "os": os_name.strip('"') if os_name else None,
        "python": platform.python_version(),
        "postgresql": settings.pop("server_version"),
        "postgresql_settings": settings,
        "psycopg2": psycopg2.__version__.split()[0],
        "taskomatic_version": __version__,
        "commit": _git("rev-parse", "HEAD"),
        "commit_dirty": bool(status) if status is not None else None,
    }


# -- the daemon's settings ---------------------------------------------------------------


def daemon_config(overrides: list[str]) -> dict[str, Any]:
    """The settings every taskomatic run had: defaults (empty file, no environment) plus ``overrides``."""
    from dataclasses import asdict

    from taskomatic import config as config_mod

    resolved = asdict(config_mod.load(os.devnull, environ={}, overrides=config_mod.parse_overrides(overrides)))
    for private in ("dsn", "state_dir", "source_path", "shards", "given"):
        resolved.pop(private, None)
    return resolved


def check_overrides(parser: argparse.ArgumentParser, overrides: Sequence[str] | None,
                    *resolve_with: Sequence[str]) -> None:
    """``--set NAME=VALUE`` options the daemon would refuse end the command with a usage error.

    ``resolve_with``: settings to resolve them with as well (a suite's own overrides), so a value that only
    fails once combined is caught too.
    """
    if not overrides:
        return
    from taskomatic import config as config_mod

    try:
        config_mod.parse_overrides(list(overrides))
        for extra in resolve_with:
            daemon_config([*extra, *overrides])
    except config_mod.ConfigError as exc:
        parser.error(str(exc))


# -- databases ----------------------------------------------------------------------------


def dsn_for(server_dsn: str, dbname: str) -> str:
    """The same server, user and options, another database."""
    return str(psycopg2.extensions.make_dsn(server_dsn, dbname=dbname))


def _admin(server_dsn: str) -> Any:
    """A connection to create and drop databases: to the server's own database (the private server's
    ``taskomatic``, or the database a ``--dsn`` names), never altered, only connected to."""
    conn = psycopg2.connect(server_dsn, application_name="bench")
    conn.autocommit = True
    return conn


def create_database(server_dsn: str, name: str) -> str:
    """A fresh database ``name`` (dropped first if it exists) migrated by ``taskomatic.db.migrate``; its DSN."""
    from taskomatic.db import migrate

    admin = _admin(server_dsn)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    dsn = dsn_for(server_dsn, name)
    conn = psycopg2.connect(dsn)
    migrate.upgrade(conn)
    conn.close()
    return dsn


def drop_database(server_dsn: str, name: str) -> None:
    admin = _admin(server_dsn)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def make_template(server_dsn: str, name: str = TEMPLATE_DB) -> None:
    """The migrated template every run's database is copied from."""
    create_database(server_dsn, name)


@contextmanager
def fresh_database(server_dsn: str, template: str = TEMPLATE_DB) -> Iterator[str]:
    """A copy of the template for one run (its DSN, a unique name), dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = _admin(server_dsn)
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
        yield dsn_for(server_dsn, name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


INSERT_SQL = """
INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by)
SELECT 'Vm', u.key, u.action, u.args::jsonb, 'bench'
FROM unnest(%s::bigint[], %s::text[], %s::text[]) WITH ORDINALITY AS u(key, action, args, n)
ORDER BY u.n
"""


# A backlog of noop tasks over VM ids 1..keys, in one statement (bench.claims and bench.bounded).
NOOP_BACKLOG_SQL = """
INSERT INTO tasks (task_target_type, task_target_id, action, args, submitted_by)
SELECT 'Vm', (g %% %(keys)s) + 1, 'noop', '{}'::jsonb, 'bench'
FROM generate_series(1, %(rows)s) AS g
"""


def insert_tasks(conn: Any, tasks: list[PlannedTask]) -> None:
    """Queue tasks in one statement (one transaction, one NOTIFY), in list order."""
    with conn.cursor() as cur:
        cur.execute(INSERT_SQL, ([t.key for t in tasks], [t.action for t in tasks], [t.args_json for t in tasks]))
    conn.commit()


def unfinished(conn: Any) -> int:
    """Tasks queued or running."""
    with conn.cursor() as cur:
        # state IN ('queued', 'running') as its two partial indexes hold it (migration 0010).
        cur.execute("SELECT count(*) FROM tasks WHERE (state = 'queued' AND claimed_by IS NULL) "
                    "OR (claimed_by IS NOT NULL AND state IN ('queued', 'running'))")
        value = int(cur.fetchone()[0])
    conn.commit()
    return value


def fetch_rows(conn: Any, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def fetch_scalar(conn: Any, sql: str, params: Any = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


# -- the daemons ----------------------------------------------------------------------------


def log_lines(runner: Runner, needles: Sequence[str]) -> list[str]:
    """The lines of a runner's log that hold any of ``needles``."""
    try:
        text = runner.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if any(n in line for n in needles)]


def check_running(runners: Sequence[Runner], what: str = "instance", when: str = "",
                  skip: int | None = None) -> None:
    """RunnerFailed if one of the runners (but ``skip``, an index) has exited, with its log's tail."""
    for i, r in enumerate(runners):
        if i != skip and r.process.poll() is not None:
            raise RunnerFailed(f"{what} {i + 1} exited with {r.process.returncode}{when}:\n{r.log_tail()}")


class Harness:
    """One benchmark's private PostgreSQL, work directory, signals, runners and nodes (see the module doc).

    ``prefix``: of the work directory under /tmp. ``announce``: printed with its path once it exists.
    ``template``: migrate the template database :meth:`fresh_database` copies. ``signals``: SIGTERM raises
    :class:`Interrupted` and SIGINT KeyboardInterrupt while inside. ``server_dsn``: use that PostgreSQL
    server instead of a private one: every database the bench makes there has a unique name (the template
    too) and is dropped on the way out; the database the dsn names is only connected to, never changed.
    """

    def __init__(self, prefix: str, keep_work_dir: bool = False, announce: str | None = None,
                 template: bool = True, signals: bool = True, server_dsn: str | None = None) -> None:
        self.prefix = prefix
        self.external_dsn = server_dsn
        self.template_name = TEMPLATE_DB if server_dsn is None else f"bench_template_{uuid.uuid4().hex[:12]}"
        self.keep_work_dir = keep_work_dir
        self.announce = announce
        self.template = template
        self.signals = signals
        self.started: list[Runner] = []  # every runner started and not yet stopped
        self.nodes: list[lifecycle.Nodes] = []  # libvirt nodes to stop on the way out
        self.machine: dict[str, Any] = {}
        self._previous: list[tuple[int, Any]] = []

    def __enter__(self) -> Harness:
        from taskomatic.embedded.postgres import EmbeddedPostgres

        self.base = Path(tempfile.mkdtemp(prefix=self.prefix, dir="/tmp"))
        self.base.chmod(0o755)  # the unprivileged PostgreSQL (and libvirtd) user must reach it
        self.pg = EmbeddedPostgres(self.base / "postgres") if self.external_dsn is None else None
        if self.signals:
            def on_term(_signum: int, _frame: object) -> None:
                raise Interrupted()

            self._previous = [(signal.SIGTERM, signal.getsignal(signal.SIGTERM))]
            signal.signal(signal.SIGTERM, on_term)
            # Ctrl-C must clean up even when the bench was started with SIGINT ignored (nohup, `&`).
            self._previous.append((signal.SIGINT, signal.signal(signal.SIGINT, signal.default_int_handler)))
        try:
            if self.announce:
                print(f"{self.announce}: {self.base}", flush=True)
            if self.pg is not None:
                self.pg.start()
            if self.template:
                make_template(self.server_dsn, self.template_name)
            conn = psycopg2.connect(self.server_dsn)
            self.machine = machine_description(conn)
            conn.close()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop_all(timeout=5)
            for nodes in list(self.nodes):
                try:
                    nodes.stop()
                except RuntimeError as error:
                    print(f"warning: {error}", file=sys.stderr)
            self.nodes.clear()
        finally:
            if self.pg is not None:
                self.pg.stop()
            elif self.template:
                try:
                    drop_database(self.server_dsn, self.template_name)
                except psycopg2.Error as error:
                    print(f"warning: could not drop the bench's database {self.template_name}: {error}",
                          file=sys.stderr)
            for signum, handler in self._previous:
                signal.signal(signum, handler)
            self._previous = []
            if self.keep_work_dir:
                print(f"kept {self.base}", file=sys.stderr)
            else:
                shutil.rmtree(self.base, ignore_errors=True)

    @property
    def server_dsn(self) -> str:
        if self.pg is None:
            assert self.external_dsn is not None
            return self.external_dsn
        return str(self.pg.dsn)

    @property
    def postmaster_pid(self) -> int:
        assert self.pg is not None and self.pg.pid is not None, "a private PostgreSQL only"
        return int(self.pg.pid)

    @property
    def local_postmaster_pid(self) -> int | None:
        """The private PostgreSQL's postmaster; None on a server given by dsn (its CPU is not measured)."""
        return None if self.pg is None or self.pg.pid is None else int(self.pg.pid)

    @cached_property
    def plugin_path(self) -> Path:
        """The bench plugin's dist-info directory, for the daemons' PYTHONPATH."""
        return write_dist_info(self.base / "plugin")

    def fresh_database(self) -> AbstractContextManager[str]:
        """A copy of the template for one run, dropped afterwards (a context manager yielding its DSN)."""
        return fresh_database(self.server_dsn, self.template_name)

    def start(self, spec: RunnerSpec, dsn: str, work_dir: Path, settings: list[str],
              baseline_poll: float = 1.0) -> Runner:
        """Start a runner (not waiting for READY); it is stopped on the way out if nobody stopped it before."""
        runner = Runner(spec, dsn, work_dir, self.plugin_path, baseline_poll, settings)
        self.started.append(runner)
        return runner

    def stop(self, runner: Runner, timeout: float = 30) -> int | None:
        """SIGTERM (drain), then SIGKILL to its group (``Runner.stop``); only once, and only while it is ours."""
        if runner not in self.started:
            return runner.process.returncode
        code = runner.stop(timeout=timeout)
        self.started.remove(runner)
        return code

    def stop_all(self, timeout: float = 5) -> None:
        for runner in list(self.started):
            self.stop(runner, timeout=timeout)

    def forget_killed(self, runner: Runner) -> None:
        """A killed runner whose processes are all gone (checked): close what the bench holds of it.

        Not ``Runner.stop``: that signals the process group id once more, and with every member gone the
        id may belong to somebody else's new group by now.
        """
        if runner._log is not None:
            runner._log.close()
            runner._log = None
        runner._close_notify()
        runner.remove_temporary_files()
        if runner in self.started:
            self.started.remove(runner)


# -- CPU between two moments -------------------------------------------------------------------


@dataclass(frozen=True)
class CpuUsage:
    """What :meth:`CpuWindow.close` measured; seconds."""

    wall_s: float
    machine_busy_s: float  # every core, every process
    bench_s: float  # this process
    groups_s: list[float]  # each daemon's process group, in the window's order
    postgres_s: float  # the postmaster's process tree
    nodes_s: float  # the libvirt nodes' process groups (0 without nodes)
    group_members: list[list[measure.ProcStat]]  # at the close, for peak RSS
    postgres_members: list[measure.ProcStat]

    @property
    def other_s(self) -> float:
        """Whatever else ran on the machine meanwhile (foreign load)."""
        return max(0.0, self.machine_busy_s - sum(self.groups_s) - self.postgres_s - self.nodes_s - self.bench_s)

    @property
    def other_share(self) -> float | None:
        """``other_s`` over the window's wall time on every core."""
        return round(self.other_s / (self.wall_s * (os.cpu_count() or 1)), 4) if self.wall_s > 0 else None


class CpuWindow:
    """CPU of the daemons' process groups, PostgreSQL, the libvirt nodes, the bench and the machine from
    construction to :meth:`close` (see :mod:`bench.measure` for how CPU seconds of a set are counted)."""

    def __init__(self, groups: list[int], postmaster_pid: int | None, node_pids: list[int] | None = None) -> None:
        self.groups = groups
        self.postmaster_pid = postmaster_pid
        self.node_pids = node_pids
        stats = measure.all_stats()
        self._groups_before = [measure.cpu_snapshot(measure.group_members(g, stats)) for g in groups]
        self._pg_before = measure.cpu_snapshot(self._postgres(stats))
        self._nodes_before = (measure.cpu_snapshot(lifecycle.node_cpu_members(node_pids, stats))
                              if node_pids is not None else {})
        self._machine_before, self._self_before = measure.machine_busy_seconds(), measure.self_cpu_seconds()
        self._wall_start = time.monotonic()

    def close(self) -> CpuUsage:
        wall = time.monotonic() - self._wall_start
        machine_busy = measure.machine_busy_seconds() - self._machine_before
        bench = measure.self_cpu_seconds() - self._self_before
        stats = measure.all_stats()
        members = [measure.group_members(g, stats) for g in self.groups]
        groups_s = [measure.cpu_seconds(before, measure.cpu_snapshot(m))
                    for before, m in zip(self._groups_before, members, strict=True)]
        pg_members = self._postgres(stats)
        pg = measure.cpu_seconds(self._pg_before, measure.cpu_snapshot(pg_members))
        nodes = (measure.cpu_seconds(self._nodes_before,
                                     measure.cpu_snapshot(lifecycle.node_cpu_members(self.node_pids, stats)))
                 if self.node_pids is not None else 0.0)
        return CpuUsage(wall, machine_busy, bench, groups_s, pg, nodes, members, pg_members)

    def _postgres(self, stats: list[measure.ProcStat]) -> list[measure.ProcStat]:
        """The postmaster's tree; nobody for a server that is not ours (it may be on another machine)."""
        return [] if self.postmaster_pid is None else measure.tree_members(self.postmaster_pid, stats)
