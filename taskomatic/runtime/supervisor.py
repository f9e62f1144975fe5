"""The supervisor: owns signals, starts and restarts the fetcher, the shards
and the reconciler (the periodic host-status pass).

Signal handlers only record the signal (and wake the loop through a pipe);
the loop acts on it:

- SIGTERM: drain. The fetcher stops claiming, shards finish their current
  task, whatever was claimed but not started is handed back; exit 0.
- a second SIGTERM, or SIGINT: stop fast. Children get SIGINT, and SIGKILL
  after ``fast_stop_timeout``; an interrupted task is reconciled at next start.
- SIGHUP: reload the configuration; children reload too.

Children are forked by a fork server (``child_start = forkserver``, the
default): a fresh interpreter the supervisor starts with nothing but a socket,
which imports what children need and freezes its heap, so a shard shares those
pages (children.child_context). With ``child_start = spawn`` each child is a
fresh interpreter. Either way each child opens its own database and libvirt
connections, and nothing the supervisor holds (its guard connection, any
thread or lock) leaks into them. A dead child is
replaced in the same slot; one that keeps failing to boot stops the
supervisor with EXIT_CHILD_FAILING so systemd decides what next.

Multihost: when the fetcher exits with EXIT_LEASE_LOST (the database refused
to renew the lease, so other instances may own our keys already), the
supervisor stops every child, registers the instance again under a new id
and starts them afresh: nothing of the old claims is resumed, and what the
old id left is settled by whichever instance takes its keys over.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2
import sdnotify

from taskomatic import config as config_mod
from taskomatic import metrics
from taskomatic.config import Config
from taskomatic.db import instances, migrate
from taskomatic.db.store import DatabaseUnavailable, Store
from taskomatic.exitcodes import (
    EXIT_ALREADY_RUNNING,
    EXIT_CHILD_FAILING,
    EXIT_CONFIG,
    EXIT_DATABASE_REFUSED,
    EXIT_LEASE_LOST,
    EXIT_OK,
    EXIT_SCHEMA,
)
from taskomatic.logsetup import set_process_title
from taskomatic.runtime import clock, instance
from taskomatic.runtime.children import Child, child_context, children_to_respawn, note_death, start_child
from taskomatic.runtime.instance import StartupRefused, permanent_refusal
from taskomatic.runtime.messages import FetcherStatus
from taskomatic.text import first_line

log = logging.getLogger(__name__)


HEARTBEAT_INTERVAL = 10.0
# While stopping fast or for a rejoin, SIGINT goes again this often to the children still alive: one
# that was starting when it was first sent may have missed it (a child forked by the fork server
# ignores SIGINT, the server's own setting, until it puts the default back), and would otherwise hold
# the stop up until it is killed.
STOP_SIGNAL_REPEAT = 1.0


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.mp = child_context(config.child_start)
        self.notifier = sdnotify.SystemdNotifier()
        self.signals: list[int] = []
        self.stopping: str | None = None  # None, "drain" or "fast"
        self.stop_deadline = 0.0
        self.ready_sent = False
        self.last_status: FetcherStatus | None = None
        self.last_status_at = time.monotonic()
        self.done_history: list[tuple[float, int]] = []
        self.store: Store | None = None
        self.instance_id = 0
        self.children: list[Child] = []
        self.status_reader: Any = None
        self.socket_path = ""
        self.exit_code = EXIT_OK
        self.multihost = config.mode == "multihost"
        # Moment (lease.lease_clock) until which shards may start tasks: the fetcher sets it at each
        # renewal in multihost mode; standalone has no lease.
        self.lease_until = self.mp.Value("d", 0.0 if self.multihost else math.inf, lock=False)
        self.rejoining = False
        self.rejoin_at = 0.0
        self.stop_signal_again_at = 0.0

    # -- startup --------------------------------------------------------------------
    def _wait_for_database(self, wake_read: int) -> bool:
        """Connect, waiting for a database that is down (exponential backoff, capped).

        Waiting is right at start: systemd often starts taskomatic before the
        database (or the network to it) is up. Each attempt and the next delay
        are logged and shown in systemd's STATUS; EXTEND_TIMEOUT_USEC keeps
        the unit's start timeout from killing a daemon that is only waiting. A
        refusal no wait can cure (bad password, unknown database or role,
        pg_hba.conf) is raised at once. False: a signal asked to stop meanwhile.
        """
        delay = 1.0
        attempt = 0
        while True:
            attempt += 1
            try:
                self.store = Store.open(self.config.dsn, "taskomatic supervisor", self.config.connect_timeout)
            except psycopg2.ProgrammingError as exc:  # a DSN libpq cannot parse (config.py checks it first)
                raise StartupRefused(f"bad dsn: {str(exc).strip()}", EXIT_CONFIG) from None
            except DatabaseUnavailable as exc:
                reason = str(exc)
                if permanent_refusal(reason):
                    raise StartupRefused(f"{reason}; not retried, waiting cannot fix this: correct the dsn "
                                         "(user, password, dbname) or the server's roles and pg_hba.conf, "
                                         "then start taskomatic again", EXIT_DATABASE_REFUSED) from None
                log.warning("waiting for the database (attempt %d): %s; retry in %g s", attempt, reason, delay)
                self.notifier.notify(f"STATUS=waiting for the database: {reason}; retry in {delay:g} s")
                # The unit is still "activating": give systemd's start timeout this attempt and the next.
                extend = int((delay + self.config.connect_timeout + 5.0) * 1_000_000)
                self.notifier.notify(f"EXTEND_TIMEOUT_USEC={extend}")
                if not self._sleep_unless_stopped(wake_read, delay):
                    log.info("stopped while waiting for the database")
                    return False
                delay = min(delay * 2, self.config.startup_retry_max)
                continue
            if attempt > 1:
                log.info("the database answered after %d attempts", attempt)
                self.notifier.notify("STATUS=database reached; starting")
            return True

    def _sleep_unless_stopped(self, wake_read: int, seconds: float) -> bool:
        """Sleep (woken by signals); False if SIGTERM or SIGINT arrived. SIGHUP reloads meanwhile."""
        import select

        deadline = time.monotonic() + seconds
        while True:
            while self.signals:
                signum = self.signals.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    return False
                if signum == signal.SIGHUP:  # not ready yet: no RELOADING/READY for systemd
                    try:
                        self.config = config_mod.reload(self.config, announce=True)
                        log.info("SIGHUP: configuration reloaded")
                    except config_mod.ConfigError as exc:
                        log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            ready, _, _ = select.select([wake_read], [], [], left)
            if ready:
                try:
                    os.read(wake_read, 512)
                except BlockingIOError:
                    pass

    def start(self) -> None:
        """Check the schema, take the guard, settle what an earlier run left (connected already)."""
        if self.store is None:
            self.store = Store.open(self.config.dsn, "taskomatic supervisor", self.config.connect_timeout)
        if self.config.auto_migrate:
            migrate.upgrade_at_start(self.store.conn)
        try:
            migrate.check_current(self.store.conn)
        except migrate.SchemaOutOfDate as exc:
            raise StartupRefused(str(exc), EXIT_SCHEMA) from None
        if not instance.take_guard(self.store, self.config.mode):
            holder = instance.guard_holder(self.store)
            raise StartupRefused(
                f"another taskomatic instance holds this database{holder}; a standalone instance "
                "must be the only one (stop it, or run both with --mode multihost)",
                EXIT_ALREADY_RUNNING)
        self.instance_id = instance.register(self.store, self.config)
        instance.take_over_leftovers(self.store, self.instance_id, self.multihost)
        self.store.commit()
        log.info("instance %d started (%s, %d shards)", self.instance_id, self.config.mode, self.config.shards)

    # -- children -------------------------------------------------------------------
    def _socket_path(self) -> str:
        run_dir = self.config.resolved_runtime_dir()
        path = run_dir / f"fetcher-{self.instance_id}.sock"
        if len(str(path)) < 100:  # AF_UNIX paths are limited to 108 bytes
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            return str(path)
        return str(Path(tempfile.mkdtemp(prefix="taskomatic-")) / "fetcher.sock")

    def _reap(self, child: Child) -> None:
        process = child.process
        process.join(2)  # it is dead (its sentinel fired); this reaps it
        code = process.exitcode
        child.process = None
        metrics.mark_dead(process.pid)
        if self.stopping or self.rejoining:
            return
        if child.role == "fetcher" and code == EXIT_LEASE_LOST:
            self._begin_rejoin()
            return
        now = time.monotonic()
        lived = now - child.started_at
        how = f"exit code {code}" if code is not None and code >= 0 else f"signal {-(code or 0)}"
        log.warning("%s %d (pid %d) died (%s) after %.1fs; restarting it in the same slot",
                    child.role, child.slot, process.pid, how, lived)
        metrics.child_restarted(child.role)
        note_death(child, lived, now)

    # -- signals --------------------------------------------------------------------
    def _record_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGTERM and self.stopping is None:
                self._begin_drain()
            else:
                self._begin_fast_stop(signal.Signals(signum).name)

    def _begin_drain(self) -> None:
        log.info("SIGTERM: draining (a second SIGTERM or SIGINT stops fast)")
        self.notifier.notify("STOPPING=1")
        self.stopping = "drain"
        self.stop_deadline = time.monotonic() + self.config.drain_timeout
        fetcher = self.children[0].process
        if fetcher is not None:
            os.kill(fetcher.pid, signal.SIGTERM)
        else:  # no fetcher to tell the shards: let them finish their task and go
            self._signal_children(signal.SIGTERM, shards_only=True)
        reconciler = self.children[-1].process
        if reconciler is not None:
            os.kill(reconciler.pid, signal.SIGTERM)

    def _begin_fast_stop(self, why: str) -> None:
        if self.stopping == "fast":
            return
        log.info("%s: stopping fast", why)
        self.notifier.notify("STOPPING=1")
        self.stopping = "fast"
        self.stop_deadline = time.monotonic() + self.config.fast_stop_timeout
        self._signal_children(signal.SIGINT)
        self.stop_signal_again_at = time.monotonic() + STOP_SIGNAL_REPEAT

    def _repeat_stop_signal(self, now: float, alive: list[Child]) -> None:
        """Stopping fast or rejoining: SIGINT again, now and then, to the children not gone yet."""
        if alive and (self.stopping == "fast" or self.rejoining) and now >= self.stop_signal_again_at:
            self._signal_children(signal.SIGINT)
            self.stop_signal_again_at = now + STOP_SIGNAL_REPEAT

    def _begin_rejoin(self) -> None:
        """Lease lost: stop every child (a shard finishes its call; its writes are refused)."""
        log.warning("instance %d lost its lease; stopping its processes to rejoin under a new id",
                    self.instance_id)
        self.lease_until.value = 0.0
        self.rejoining = True
        self.stop_deadline = time.monotonic() + self.config.fast_stop_timeout
        self._signal_children(signal.SIGINT)
        self.stop_signal_again_at = time.monotonic() + STOP_SIGNAL_REPEAT

    def _finish_rejoin(self) -> None:
        """Every child is gone: register afresh and start them all again."""
        try:
            if not self._reconnect():
                raise StartupRefused("a standalone instance holds the database now", EXIT_ALREADY_RUNNING)
            old = self.instance_id
            assert self.store is not None
            instances.mark_stopped(self.store, old)
            self.instance_id = instance.register(self.store, self.config)
            self.store.commit()
        except (psycopg2.Error, DatabaseUnavailable) as exc:
            self._drop_store("cannot rejoin yet, the database is not answering", exc)
            self.rejoin_at = time.monotonic() + 1.0  # try again soon
            return
        log.info("instance %d rejoined as instance %d", old, self.instance_id)
        self.rejoining = False
        self.socket_path = self._socket_path()
        # Metrics keep the sample directory they had: the fork server that forks the new children kept the
        # environment it started with, and counters go on from where they were (a scrape sees no reset).
        for child in self.children:
            child.boot_failures, child.respawn_at = 0, 0.0
            self._spawn(child)

    def _signal_children(self, signum: int, shards_only: bool = False) -> None:
        for child in self.children:
            if child.process is not None and (child.role == "shard" or not shards_only):
                try:
                    os.kill(child.process.pid, signum)
                except ProcessLookupError:
                    pass

    def _reload(self) -> None:
        self.notifier.notify("RELOADING=1")
        try:
            self.config = config_mod.reload(self.config, announce=True)
        except config_mod.ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
        else:
            self._signal_children(signal.SIGHUP)
            log.info("SIGHUP: configuration reloaded")
        self.notifier.notify("READY=1")

    # -- main loop ------------------------------------------------------------------
    def run(self) -> int:
        set_process_title(f"taskomatic: supervisor ({self.config.mode}, {self.config.shards} shards)")
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        os.set_blocking(wake_read, False)
        signal.set_wakeup_fd(wake_write)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._record_signal)
        try:
            if not self._wait_for_database(wake_read):
                return EXIT_OK
            self.start()
            clock.anchor_for_children()  # before any child (and the fork server) starts
            self.socket_path = self._socket_path()
            if self.config.metrics_port:
                # Before any child starts: they find the sample directory in their environment.
                metrics.prepare_directory(self.config.resolved_runtime_dir(), self.instance_id)
            # Layout: the fetcher first, the shards by slot, the reconciler last.
            self.children = [Child("fetcher", 0), *(Child("shard", i) for i in range(self.config.shards)),
                             Child("reconciler", 0)]
            for child in self.children:
                self._spawn(child)
            return self._loop(wake_read)
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wake_read)
            os.close(wake_write)
            self._shutdown()

    def _loop(self, wake_read: int) -> int:
        from multiprocess.connection import wait

        next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        while True:
            self._handle_signals()
            now = time.monotonic()
            alive = [c for c in self.children if c.process is not None]
            if self.stopping and not alive:
                log.info("all processes stopped")
                return self.exit_code
            self._repeat_stop_signal(now, alive)
            if self.stopping and now >= self.stop_deadline:
                if self.stopping == "drain":
                    self._begin_fast_stop("drain timeout")
                else:
                    for child in alive:
                        log.warning("%s %d did not stop in time; killing it", child.role, child.slot)
                        child.process.kill()
                    self.stop_deadline = now + self.config.fast_stop_timeout
            if self.stopping == "drain" and self.children[0].process is None:
                self._signal_children(signal.SIGTERM, shards_only=True)
            if self.rejoining and not self.stopping:
                if not alive:
                    if now >= self.rejoin_at:
                        self._finish_rejoin()
                elif now >= self.stop_deadline:
                    for child in alive:
                        log.warning("%s %d did not stop in time; killing it", child.role, child.slot)
                        child.process.kill()
                    self.stop_deadline = now + self.config.fast_stop_timeout
            elif not self.stopping:
                self._keep_children_up(now)
                self._check_fetcher_heartbeat(now)
                self._check_shard_deadlines()
                if now >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = now + HEARTBEAT_INTERVAL
            waitables: list[Any] = [wake_read]
            waitables += [c.process.sentinel for c in self.children if c.process is not None]
            if self.status_reader is not None:
                waitables.append(self.status_reader)
            for ready in wait(waitables, timeout=1.0):
                if ready == wake_read:
                    try:
                        os.read(wake_read, 512)
                    except BlockingIOError:
                        pass
                elif ready is self.status_reader:
                    self._read_status()
                else:
                    for child in self.children:
                        if child.process is not None and child.process.sentinel == ready:
                            self._reap(child)

    def _keep_children_up(self, now: float) -> None:
        """Respawn the dead children that are due, each in its slot; give up on one that keeps failing to boot."""
        due, failing = children_to_respawn(self.children, now)
        for child in due:
            self._spawn(child)
        if failing is not None:
            log.error("%s %d failed to start %d times in a row; giving up",
                      failing.role, failing.slot, failing.boot_failures)
            self._begin_fast_stop("child failing")
            self.exit_code = EXIT_CHILD_FAILING

    def _spawn(self, child: Child) -> None:
        reader = start_child(self.mp, child, self.config, self.instance_id, self.socket_path, self.lease_until)
        if reader is not None:  # a new fetcher: its status comes through this pipe now
            if self.status_reader is not None:
                self.status_reader.close()
            self.status_reader = reader
            self.last_status_at = time.monotonic()

    def _heartbeat(self) -> None:
        """Record that the instance lives; after a lost connection, take the guard again."""
        try:
            if not self._reconnect():
                log.error("lost the instance guard while the database was away, and another "
                          "instance holds it now; stopping")
                self.exit_code = EXIT_ALREADY_RUNNING
                self._begin_fast_stop("guard lost")
                return
            assert self.store is not None
            instances.heartbeat(self.store, self.instance_id)
            self.store.commit()
        except (psycopg2.Error, DatabaseUnavailable) as exc:
            self._drop_store("supervisor cannot reach the database", exc)

    def _reconnect(self) -> bool:
        """After a lost connection: a new one, holding the instance guard again. False: someone took it."""
        if self.store is not None:
            return True
        self.store = Store.open(self.config.dsn, "taskomatic supervisor", self.config.connect_timeout)
        if not instance.take_guard(self.store, self.config.mode):
            return False
        log.info("database connection restored; instance guard held again")
        return True

    def _drop_store(self, what: str, exc: BaseException) -> None:
        log.warning("%s: %s", what, first_line(exc))
        if self.store is not None:
            self.store.close()
        self.store = None

    def _read_status(self) -> None:
        try:
            while self.status_reader.poll(0):
                status = self.status_reader.recv()
                if isinstance(status, FetcherStatus):
                    self._on_status(status)
        except (EOFError, OSError):
            self.status_reader.close()
            self.status_reader = None

    def _on_status(self, status: FetcherStatus) -> None:
        now = time.monotonic()
        self.last_status, self.last_status_at = status, now
        self.done_history.append((now, status.done_total))
        self.done_history = [(t, d) for t, d in self.done_history if now - t <= 60.0]
        if status.all_shards_up and not self.ready_sent and not self.stopping:
            self.notifier.notify("READY=1")
            self.ready_sent = True
            log.info("ready: fetcher and %d shards up", self.config.shards)
        per_minute = 0
        if len(self.done_history) >= 2:
            (t0, d0), (t1, d1) = self.done_history[0], self.done_history[-1]
            if t1 > t0 and d1 >= d0:
                per_minute = int((d1 - d0) * 60.0 / (t1 - t0))
        shards_alive = sum(1 for c in self.children if c.role == "shard" and c.process is not None)
        self.notifier.notify(
            f"STATUS=holding {status.queued_local}, running {status.running}, "
            f"done {per_minute}/min, shards {shards_alive}/{self.config.shards} alive")
        if status.all_shards_up and not self.stopping:
            self.notifier.notify("WATCHDOG=1")

    def _check_fetcher_heartbeat(self, now: float) -> None:
        fetcher = self.children[0].process
        if fetcher is not None and now - self.last_status_at > self.config.heartbeat_timeout:
            log.error("fetcher (pid %d) silent for %.0fs; killing it to restart it", fetcher.pid,
                      now - self.last_status_at)
            fetcher.kill()
            self.last_status_at = now

    def _check_shard_deadlines(self) -> None:
        moment = time.monotonic()  # the shards set their deadlines on it: a wall-clock step kills nobody
        for child in self.children:
            if child.role != "shard":
                continue
            deadline = child.deadline.value if child.deadline is not None else 0.0
            if child.process is not None and deadline and moment > deadline:
                log.error("shard %d (pid %d) is stuck on a task past task_timeout (%gs); killing it, "
                          "its task will be reconciled", child.slot, child.process.pid, self.config.task_timeout)
                child.deadline.value = 0.0
                child.process.kill()

    def _shutdown(self) -> None:
        for child in self.children:
            if child.process is not None and child.process.is_alive():
                child.process.kill()
                child.process.join(5)
        if self.store is not None:
            try:
                self.store.rollback()
                if self.instance_id:
                    instance.record_stop(self.store, self.instance_id, self.multihost)
                self.store.commit()
            except Exception as exc:  # the database may be what failed
                log.warning("could not record the stop: %s", exc)
            self.store.close()


def run_daemon(config: Config) -> int:
    """Run one instance in the foreground until stopped; the exit code to return."""
    supervisor = Supervisor(config)
    try:
        return supervisor.run()
    except StartupRefused as exc:
        log.error("%s", exc)
        return exc.exit_code
