"""The multihost lease, as one instance keeps it.

The database decides whether a lease has run out (its clock, in the
renewal, the takeover and every fenced write). The instance keeps a local
copy of "until when starting a task is safe" in shared memory
(``lease_until``, on ``lease_clock``) that ends before the database's: the
shards check it before they start a task and again before they touch a node.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from taskomatic import metrics
from taskomatic.config import Config
from taskomatic.db import instances
from taskomatic.db.store import Store

log = logging.getLogger(__name__)

# The shards start tasks only until this share of the lease has passed since the
# renewal was sent: the margin covers a task's start after the check and clock drift.
LEASE_SAFE_SHARE = 0.8


class LeaseLost(Exception):
    """The database refused to renew the instance's lease."""


def lease_clock() -> float:
    """The clock the local copy of the lease is kept on, shared by all processes of a machine.

    CLOCK_BOOTTIME: like the monotonic clock it ignores wall-clock jumps, and unlike
    it, it keeps counting while the machine is suspended, so a node that wakes up
    after its lease ran out does not take its old lease for a live one.
    """
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def limit_idle_transaction(store: Store, config: Config) -> None:
    """Multihost, first in a write transaction: a frozen process's locks last at most a lease."""
    if config.mode == "multihost":
        instances.limit_idle_transaction(store, max(1000, int(config.lease_seconds * 1000)))


class LeaseKeeper(threading.Thread):
    """Renews the instance's lease every lease_renew_interval, on a connection of its own.

    A thread, so that a slow claim round (a bad plan, a lock wait) cannot make
    the fetcher miss renewals and lose a lease it deserves; psycopg2 releases
    the GIL while it waits on the server. The fetcher's loop calls ``check``:
    a lost lease or a broken connection ends the fetcher there.
    """

    def __init__(self, config: Callable[[], Config], instance_id: int, lease_until: Any) -> None:
        super().__init__(name="taskomatic-lease", daemon=True)
        self.config = config  # the fetcher's current configuration (it reloads on SIGHUP)
        self.instance_id = instance_id
        self.lease_until = lease_until  # multiprocess Value('d'), shared with the shards
        self.store = Store.open(config().dsn, "taskomatic fetcher (lease)", config().connect_timeout)
        self.lost = False
        self.failure: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                if not self.renew():
                    self.lost = True
                    return
            except Exception as exc:  # the fetcher raises it in its own thread
                self.failure = exc
                return
            self.stopping.wait(self.config().lease_renew_interval)

    def renew(self) -> bool:
        """Extend the lease; tell the shards until when starting a task is safe. False: lost."""
        config = self.config()
        sent = lease_clock()
        with self.store.transaction():
            renewed = instances.renew_lease(self.store, self.instance_id, config.lease_seconds)
        if not renewed:
            self.lease_until.value = 0.0
            metrics.lease_lost()
            log.error("lease lost: the database says it ran out (paused, cut off or too slow); other "
                      "instances may own our keys now, so this instance rejoins under a new id")
            return False
        self.lease_until.value = sent + config.lease_seconds * LEASE_SAFE_SHARE
        metrics.lease_renewed()
        return True

    def check(self) -> None:
        if self.lost:
            raise LeaseLost
        if self.failure is not None:
            raise self.failure


