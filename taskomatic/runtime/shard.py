"""A shard process: runs the tasks the fetcher sends it, one key after another.

This module keeps the shard's loop, its channel to the fetcher (and the
reconnect when the fetcher is replaced) and its signals. What happens to a
task is elsewhere, one module per step:

- ``execution.py``: batches, reconciling interrupted tasks, prepare, begin
  (in one transaction), perform;
- ``outcomes.py``: held outcomes, fencing, the commits that write them;
- ``parking.py``: keys set aside for a retry or for their children.

The fetcher sends ``Run`` messages; the shard answers ``Started`` when it
starts tasks, ``Performed`` when they ran (their outcomes held; not when a
fetcher's lookahead of work is queued here),
``Ended`` once outcomes are committed and ``Deferred`` for parked tasks.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from multiprocess.connection import Connection

from taskomatic import config as config_mod
from taskomatic.actions.base import Action, ActionContext
from taskomatic.actions.connections import LibvirtConnections
from taskomatic.actions.registry import load_actions
from taskomatic.config import Config
from taskomatic.db.store import Store
from taskomatic.logsetup import set_process_title, setup_logging
from taskomatic.model import TaskRow
from taskomatic.runtime import channel as wire
from taskomatic.runtime.execution import Execution, ShardLink
from taskomatic.runtime.lease import lease_clock
from taskomatic.runtime.messages import Deferred, Drain, Drained, Ended, Hello, Run, Several
from taskomatic.runtime.outcomes import CONNECTION_LOST, Outcomes
from taskomatic.runtime.parking import ParkingLot
from taskomatic.runtime.readiness import Readiness
from taskomatic.text import first_line

log = logging.getLogger(__name__)

_RECONNECT_SECONDS = 1.0
# Falling idle with outcomes held: how long to wait for the next task (the
# fetcher sends it on Performed), whose start then commits them too.
NEXT_TASK_WAIT = 0.002


class Shard:
    def __init__(self, slot: int, shards: int, config: Config, instance_id: int,
                 fetcher_socket: str, deadline: Any, lease_until: Any) -> None:
        self.slot = slot
        self.shards = shards
        self.config = config
        self.lease_until = lease_until  # multiprocess Value('d') on lease.lease_clock; the fetcher renews it
        self.fetcher_socket = fetcher_socket
        self.channel: Connection | None = None
        self.readiness = Readiness()
        self.outbox: list[object] | None = None  # inside together(): messages to send in one write
        self.signals: list[int] = []
        self.stop_fast = False
        self.draining = False
        store = Store.open(config.dsn, f"taskomatic shard {slot}", config.connect_timeout, begin_with_first=True)
        self.actions: dict[str, Action] = load_actions()
        self.ctx = ActionContext(store, config,
                                 LibvirtConnections(config.keepalive_interval, config.keepalive_count),
                                 lease_ok=self._lease_ok)
        self.parking = ParkingLot(config.retry_limit, config.retry_backoff_max)
        self.outcomes = Outcomes(store, config, instance_id, config.mode == "multihost", self.parking,
                                 lambda ends: self._send(Ended(ends)), self._action_label)
        self.execution = Execution(slot, instance_id, config, store, self.ctx, self.actions, self.parking,
                                   self.outcomes, ShardLink(self._send, self._fetcher_gone, self._lease_ok,
                                             self._together),
                                   deadline)

    @property
    def queue(self) -> deque[TaskRow]:
        return self.execution.queue

    # -- signals: the handler only records; the loop acts ---------------------
    def _record_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self._reload()
            else:  # SIGINT / SIGTERM: the supervisor wants us gone after this task
                self.stop_fast = True

    def _reload(self) -> None:
        try:
            config = config_mod.reload(self.config)
        except config_mod.ConfigError as exc:
            log.error("reload refused, keeping the old configuration: %s", exc)
            return
        self.config = self.ctx.config = self.outcomes.config = self.execution.config = config

    # -- channel to the fetcher -------------------------------------------------
    def _connect(self) -> bool:
        # Settle the last outcomes first, and hold nothing unstarted: a new fetcher
        # sends every unfinished task again (what was set aside after the link broke
        # mid-batch too: a parked task, or one put back for its lease).
        self.outcomes.flush()
        self._drop_unstarted()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.fetcher_socket)
        except OSError as exc:
            sock.close()
            log.debug("fetcher not reachable yet: %s", exc)
            return False
        self.channel = Connection(sock.detach())
        wire.send(self.channel, Hello(self.slot, os.getpid()))
        return True

    def _lost_fetcher(self) -> None:
        """The fetcher is gone: drop what has not started; its successor sends it again.

        The successor may give those tasks to any shard, so this one must not
        run them. What is committed ``running`` (the rest of a batch) is
        finished first; the successor sends such a task only to the slot that
        marked it (``run_by_shard``), so it comes back here to be settled.
        """
        self.channel = None
        log.warning("lost the fetcher; dropped %d tasks that had not started (they are sent again)",
                    self._drop_unstarted())

    def _drop_unstarted(self) -> int:
        dropped = len(self.queue) + len(self.parking.release_all())
        self.queue.clear()
        return dropped

    def _fetcher_gone(self) -> bool:
        """Has the fetcher that sent us our tasks died? Reads what it sent meanwhile.

        Checked just before a batch is marked running: a fetcher's successor may
        already have sent those tasks to another shard (it does not wait for a
        shard stuck in a long prepare forever), so they must not start here.
        """
        self._receive(0)
        return self.channel is None

    def _send(self, message: object) -> None:
        if self.outbox is not None:
            self.outbox.append(message)
            return
        if self.channel is None:
            return
        try:
            wire.send(self.channel, message)
        except (OSError, EOFError):
            self._lost_fetcher()

    @contextmanager
    def _together(self) -> Iterator[None]:
        """Messages sent inside go in one write when it ends (on an error too: they are true), in order.

        Each message wakes the fetcher; a batch's start used to send what its
        commit ended and what it started apart. The messages held are those
        made once the commit is done (prepare runs before it), so none waits
        for an action.
        """
        if self.outbox is not None:  # nested: the outermost sends
            yield
            return
        self.outbox = []
        try:
            yield
        finally:
            held, self.outbox = self.outbox, None
            if held:
                self._send(held[0] if len(held) == 1 else Several(tuple(held)))

    def _receive(self, timeout: float) -> None:
        if self.channel is None:
            return
        try:
            ready = self.readiness.wait([self.channel], timeout)
            while ready:
                message = wire.recv(self.channel)
                if isinstance(message, Run):
                    self.queue.extend(message.tasks)
                elif isinstance(message, Drain):
                    self.draining = True
                ready = self.readiness.wait([self.channel], 0)
        except (OSError, EOFError):
            self._lost_fetcher()

    # -- main loop ----------------------------------------------------------------
    def serve(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._record_signal)
        last_attempt = 0.0
        while True:
            self._handle_signals()
            if self.channel is None and time.monotonic() - last_attempt >= _RECONNECT_SECONDS:
                last_attempt = time.monotonic()
                self._connect()
            if not self.queue and self.outcomes.pending and self.channel is not None:
                self._receive(NEXT_TASK_WAIT)
            if not self.queue:
                self.outcomes.flush()  # falling idle: the last outcome must not wait longer for a next task
                if self.channel is None:
                    time.sleep(_RECONNECT_SECONDS / 5)  # fetcher away, nothing to do: retry soon
            self._receive(self._idle_wait())
            if self.stop_fast or self.draining:
                self.outcomes.flush()
                if self.draining:
                    # Parked heads that had started stay 'running': the next start reconciles them.
                    returned = [t.id for t in self.queue] + self.parking.held_ids()
                    self._send(Drained(tuple(returned)))
                return 0
            if self.queue and not self._lease_ok():
                self.outcomes.flush()  # the database may still take it: its lease outlasts ours
                self._receive(_RECONNECT_SECONDS / 5)  # wait for a renewal; the supervisor rejoins if it is lost
                continue
            self.execution.wake_parked()
            if self.queue:
                if self.parking.is_parked(self.queue[0]):
                    task: TaskRow = self.queue.popleft()
                    self.parking.hold_behind(task)  # its key waits for a retry or for children
                    self._send(Deferred((task.id,)))
                    continue
                self.execution.run(self.execution.take_batch())

    def _lease_ok(self) -> bool:
        return lease_clock() < self.lease_until.value

    def _idle_wait(self) -> float:
        if self.queue:
            return 0.0
        wake = self.parking.next_wake()
        return 0.5 if wake is None else max(0.0, min(0.5, wake - time.monotonic()))

    def _action_label(self, task: TaskRow) -> str:
        # Only known names become metric labels: a hostile action string must not mint series.
        return task.action if task.action in self.actions else "unknown"


def shard_main(slot: int, shards: int, config: Config, instance_id: int,
               fetcher_socket: str, deadline: Any, lease_until: Any) -> None:
    """Entry point of a shard process (spawned, so it starts with nothing inherited)."""
    setup_logging(config.log_level, role=f"instance {instance_id} shard {slot}")
    set_process_title(f"taskomatic: shard {slot}/{shards}")
    # A shard runs until told; a terminal's Ctrl-C goes to the whole group and
    # the supervisor decides what it means.
    try:
        shard = Shard(slot, shards, config, instance_id, fetcher_socket, deadline, lease_until)
    except KeyboardInterrupt:  # the supervisor stopping everything while we started (a rejoin)
        raise SystemExit(0) from None
    except Exception:
        log.exception("shard %d failed to start", slot)
        raise SystemExit(3) from None
    try:
        code = shard.serve()
    except CONNECTION_LOST as exc:
        # Expected when the database restarts or ends a frozen session: the supervisor
        # replaces this shard, and its interrupted task is reconciled. One line, no traceback.
        log.error("shard %d lost its database connection (%s); exiting to be replaced", slot, first_line(exc))
        raise SystemExit(1) from None
    raise SystemExit(code)

